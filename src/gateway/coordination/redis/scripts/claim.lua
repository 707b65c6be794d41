-- Finds the live aggregation answering a key, or queues a new one at its farm's queue.
-- Mirrors coordination::policy: Freshness::accepts (a terminal result answers), admit (the
-- bounds, in that order), place and slot (where it waits), joined_place (a waiting aggregation
-- a caller joins for the first time moves up to the caller's place).
--
-- Every key is declared, so the replica reads first which ids the key and its refresh marker
-- name (the records it may touch) and passes them; when either changed meanwhile the script
-- answers `moved` and the replica reads again.
local index_key = KEYS[1]       -- {b}:key:{canonical}: the id answering the key
local queue_key = KEYS[2]       -- {b}:{farm}:queue: the farm's ids, its head first
local farms_key = KEYS[3]       -- {b}:farms: the bucket's farms with work
local live_key = KEYS[4]        -- {b}:live: the bucket's queued plus running aggregations
local record_key = KEYS[5]      -- {b}:agg:{id}: the new record
local epoch_key = KEYS[6]       -- {b}:epoch: the generation of the bucket's state
local marker_key = KEYS[7]      -- {b}:refresh:{canonical}: the key's refresh no caller joined yet
local refreshes_key = KEYS[8]   -- {b}:{farm}:refreshes: the farm's such refreshes
local version_key = KEYS[9]     -- {b}:version: when the bucket's counts last changed
local existing_key = KEYS[10]   -- {b}:agg:{the id the key named}, else the new record's key
local existing_rows = KEYS[11]  -- {b}:rows:{that id}, else the new rows' key
local refresh_key = KEYS[12]    -- {b}:agg:{the id the marker named}, else the new record's key
local fair_key = KEYS[13]       -- {b}:{farm}:fair: the order's places and turns (lib.lua)
local admission_key = KEYS[14]  -- {all}:admission, with mode `inline` only

local id = ARGV[1]              -- the new aggregation's id
local json = ARGV[2]            -- its record
local farm = ARGV[3]
local min_remaining_ms = tonumber(ARGV[4])
local max_staleness_ms = tonumber(ARGV[5])  -- -1: any
local queue_capacity = tonumber(ARGV[6])
local max_live = tonumber(ARGV[7])
local max_farms = tonumber(ARGV[8])
local id_epoch = ARGV[9]        -- the epoch the new id was minted in
local now = tonumber(ARGV[10])  -- Redis's clock as the replica reads it, ms
local caller = ARGV[11]         -- the caller's identity
local hit_window_ms = tonumber(ARGV[12])
local read_existing = ARGV[13]  -- the id the key named when the replica read it ('' none)
local read_refresh = ARGV[14]   -- the id the marker named ('' none)
local mode = ARGV[15]           -- inline | ask (answer `admit` before queueing) | given
local live_total = ARGV[16]     -- the sums the replica read (mode `given`)
local farms_total = ARGV[17]
local bucket = ARGV[18]
local caller_capacity = tonumber(ARGV[19])
local fair = ARGV[20] == '1'
local class = tonumber(ARGV[21])  -- the caller's priority: 0 interactive, 1 batch
local channel = ARGV[22]
local farm_topic = ARGV[23]
local publish_command = ARGV[24]

-- A hit for refresh-ahead, once per caller and window (policy::counts_as_hit): the caller's
-- last counted hit is kept in the record, as `seen:{caller}`.
local function hit(agg)
    local seen = 'seen:' .. caller
    local last = tonumber(redis.call('HGET', agg, seen) or '')
    if not last or now - last >= hit_window_ms then
        redis.call('HSET', agg, seen, now)
        redis.call('HINCRBY', agg, 'hits', 1)
    end
end

-- `caller` joins the active aggregation `joined_id` (record `agg`): a hit, and the first time
-- the caller asks for it while it waits, the caller's turn is spent on it and it moves up to
-- the caller's place if earlier; an interactive caller raises a batch one (its record's json
-- loses exactly `,"priority":"batch"`, wire.rs). Answers its record json, its position, and 1
-- when it moved (others' positions changed), else 0.
local function join(agg, joined_id)
    local first_ask = redis.call('HEXISTS', agg, 'seen:' .. caller) == 0
    hit(agg)
    local pos = redis.call('LPOS', queue_key, joined_id)
    local moved = 0
    if pos and pos > 0 and first_ask then
        local jc, jt, next_turn = caller_place(fair_key, fair, class, caller)
        charge(fair_key, jc, caller, next_turn)
        local c, t = place_of(refreshes_key, joined_id, redis.call('HGET', fair_key, 'p:' .. joined_id))
        if later(c, t, jc, jt) then
            redis.call('LREM', queue_key, 0, joined_id)
            pos = insert_at(queue_key, fair_key, refreshes_key, joined_id, jc, jt)
            if jc == 0 then
                local json = redis.call('HGET', agg, 'json')
                local raised, n = string.gsub(json, ',"priority":"batch"', '', 1)
                if n == 1 then redis.call('HSET', agg, 'json', raised) end
            end
            publish(publish_command, channel, farm_topic)
            moved = 1
        end
    end
    return redis.call('HGET', agg, 'json'), pos or 0, moved
end

-- Answers {verdict, record json, queue position (for `admit`: 1 when the farm has no work
-- yet), and after `joined` and `started` 1 when others' positions moved (else 0), and after
-- `started` the bucket's live, farms and version}.
if redis.call('GET', epoch_key) ~= id_epoch then return {'epoch', '', 0} end
if (redis.call('GET', index_key) or '') ~= read_existing or (redis.call('GET', marker_key) or '') ~= read_refresh then
    return {'moved', '', 0}
end
if read_existing ~= '' then
    local f = redis.call('HMGET', existing_key, 'state', 'expire_ms', 'data_ms', 'json')
    local state = f[1]
    if is_active(state) then
        local json, pos, moved = join(existing_key, read_existing)
        return {'joined', json, pos, moved}
    end
    if state then
        local remaining = tonumber(f[2] or '0') - now
        local need = 0
        if state == 'COMPLETED' then need = min_remaining_ms end
        local fresh = true
        if max_staleness_ms >= 0 then fresh = f[3] ~= false and now - tonumber(f[3]) <= max_staleness_ms end
        local rows = state ~= 'COMPLETED' or redis.call('EXISTS', existing_rows) == 1
        if remaining > 0 and remaining >= need and fresh and rows then
            hit(existing_key)
            return {'cached', f[4], 0}
        end
    end
end
-- The old result no longer answers: a refresh of the key under way becomes the caller's.
if read_refresh ~= '' then
    redis.call('DEL', marker_key)
    redis.call('SREM', refreshes_key, read_refresh)
    if is_active(redis.call('HGET', refresh_key, 'state')) then
        redis.call('SET', index_key, read_refresh)
        local json, pos, moved = join(refresh_key, read_refresh)
        return {'joined', json, pos, moved}
    end
end
local queued = redis.call('LLEN', queue_key)
if mode == 'ask' then
    if queued == 0 then return {'admit', '', 1} end
    return {'admit', '', 0}
end
local live, farms = totals(mode, admission_key, live_total, farms_total)
if live >= max_live then return {'busy_live', '', 0} end
if queued == 0 and farms >= max_farms then return {'busy_farms', '', 0} end
if queued > queue_capacity then return {'queue_full', '', 0} end
if queued > 0 and caller_capacity < queue_capacity and waiting_of(queue_key, fair_key, caller) >= caller_capacity then
    return {'caller_queue_full', '', 0}
end
local pc, pt, next_turn = caller_place(fair_key, fair, class, caller)
charge(fair_key, pc, caller, next_turn)
local position = insert_at(queue_key, fair_key, refreshes_key, id, pc, pt)
redis.call('HSET', fair_key, 'o:' .. id, caller)
if position == 0 and pc < 2 then redis.call('HSET', fair_key, 'v:' .. pc, int(pt)) end
local reordered = 0
if position < queued then
    publish(publish_command, channel, farm_topic)
    reordered = 1
end
redis.call('SADD', farms_key, farm)
redis.call('INCR', live_key)
redis.call('HSET', record_key, 'json', json, 'state', 'QUEUED', 'farm', farm, 'index', index_key, 'hits', 1,
    'seen:' .. caller, now)
redis.call('SET', index_key, id)
local counts = recount(farms_key, live_key, version_key, mode == 'inline' and admission_key or nil, bucket)
return {'started', json, position, reordered, counts[1], counts[2], counts[3]}
