-- Finds the live aggregation answering a key, or queues a new one at its farm's queue.
-- Mirrors coordination::policy: Freshness::accepts (a terminal result answers), admit (the
-- bounds, in that order) and caller_slot (a caller goes before waiting refreshes, never
-- before the head).
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
local admission_key = KEYS[13]  -- {all}:admission, with mode `inline` only

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

-- Answers {verdict, record json, queue position (for `admit`: 1 when the farm has no work
-- yet), and after `started` the bucket's live, farms and version}.
if redis.call('GET', epoch_key) ~= id_epoch then return {'epoch', '', 0} end
if (redis.call('GET', index_key) or '') ~= read_existing or (redis.call('GET', marker_key) or '') ~= read_refresh then
    return {'moved', '', 0}
end
if read_existing ~= '' then
    local f = redis.call('HMGET', existing_key, 'state', 'expire_ms', 'data_ms', 'json')
    local state = f[1]
    if is_active(state) then
        hit(existing_key)
        local pos = redis.call('LPOS', queue_key, read_existing)
        return {'joined', f[4], pos or 0}
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
    local f = redis.call('HMGET', refresh_key, 'state', 'json')
    if is_active(f[1]) then
        redis.call('SET', index_key, read_refresh)
        hit(refresh_key)
        local pos = redis.call('LPOS', queue_key, read_refresh)
        return {'joined', f[2], pos or 0}
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
local position = queued
if redis.call('SCARD', refreshes_key) > 0 then
    local waiting = redis.call('LRANGE', queue_key, 1, -1)
    for i, queued_id in ipairs(waiting) do
        if redis.call('SISMEMBER', refreshes_key, queued_id) == 1 then
            redis.call('LINSERT', queue_key, 'BEFORE', queued_id, id)
            position = i
            break
        end
    end
end
if position == queued then redis.call('RPUSH', queue_key, id) end
redis.call('SADD', farms_key, farm)
redis.call('INCR', live_key)
redis.call('HSET', record_key, 'json', json, 'state', 'QUEUED', 'farm', farm, 'index', index_key, 'hits', 1,
    'seen:' .. caller, now)
redis.call('SET', index_key, id)
local counts = recount(farms_key, live_key, version_key, mode == 'inline' and admission_key or nil, bucket)
return {'started', json, position, counts[1], counts[2], counts[3]}
