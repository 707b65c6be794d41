-- Finds the live aggregation answering a key, or queues a new one at its farm's queue.
-- Mirrors coordination::policy: Freshness::accepts (a terminal result answers), admit (the
-- bounds, in that order) and caller_slot (a caller goes before waiting refreshes, never
-- before the head).
local index_key = KEYS[1]       -- key:{canonical}: the id answering the key
local queue_key = KEYS[2]       -- {farm}:queue: the farm's ids, its head first
local farms_key = KEYS[3]       -- farms: farms with work
local live_key = KEYS[4]        -- live: queued plus running aggregations
local record_key = KEYS[5]      -- agg:{id}: the new record
local epoch_key = KEYS[6]       -- epoch: the generation of this state
local marker_key = KEYS[7]      -- refresh:{canonical}: the key's refresh no caller joined yet
local refreshes_key = KEYS[8]   -- {farm}:refreshes: the farm's such refreshes

local id = ARGV[1]              -- the new aggregation's id
local json = ARGV[2]            -- its record
local farm = ARGV[3]
local min_remaining_ms = tonumber(ARGV[4])
local max_staleness_ms = tonumber(ARGV[5])  -- -1: any
local queue_capacity = tonumber(ARGV[6])
local max_live = tonumber(ARGV[7])
local max_farms = tonumber(ARGV[8])
local record_prefix = ARGV[9]
local rows_prefix = ARGV[10]
local id_epoch = ARGV[11]       -- the epoch the new id was minted in
local now = tonumber(ARGV[12])  -- Redis's clock as the replica reads it, ms
local caller = ARGV[13]         -- the caller's identity
local hit_window_ms = tonumber(ARGV[14])

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

-- Answers {verdict, record json, queue position}.
if redis.call('GET', epoch_key) ~= id_epoch then return {'epoch', '', 0} end
local existing = redis.call('GET', index_key)
if existing then
    local agg = record_prefix .. existing
    local f = redis.call('HMGET', agg, 'state', 'expire_ms', 'data_ms', 'json')
    local state = f[1]
    if is_active(state) then
        hit(agg)
        local pos = redis.call('LPOS', queue_key, existing)
        return {'joined', f[4], pos or 0}
    end
    if state then
        local remaining = tonumber(f[2] or '0') - now
        local need = 0
        if state == 'COMPLETED' then need = min_remaining_ms end
        local fresh = true
        if max_staleness_ms >= 0 then fresh = f[3] ~= false and now - tonumber(f[3]) <= max_staleness_ms end
        local rows = state ~= 'COMPLETED' or redis.call('EXISTS', rows_prefix .. existing) == 1
        if remaining > 0 and remaining >= need and fresh and rows then
            hit(agg)
            return {'cached', f[4], 0}
        end
    end
end
-- The old result no longer answers: a refresh of the key under way becomes the caller's.
local refresh = redis.call('GET', marker_key)
if refresh then
    redis.call('DEL', marker_key)
    redis.call('SREM', refreshes_key, refresh)
    local agg = record_prefix .. refresh
    local f = redis.call('HMGET', agg, 'state', 'json')
    if is_active(f[1]) then
        redis.call('SET', index_key, refresh)
        hit(agg)
        local pos = redis.call('LPOS', queue_key, refresh)
        return {'joined', f[2], pos or 0}
    end
end
if tonumber(redis.call('GET', live_key) or '0') >= max_live then return {'busy_live', '', 0} end
local queued = redis.call('LLEN', queue_key)
if queued == 0 and redis.call('SCARD', farms_key) >= max_farms then return {'busy_farms', '', 0} end
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
return {'started', json, position}
