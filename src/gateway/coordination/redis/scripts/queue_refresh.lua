-- Queues a refresh of one due result, once across replicas. Mirrors
-- coordination::policy::refresh_verdict: its checks, in that order.
local due_key = KEYS[1]          -- {b}:due
local old_record_key = KEYS[2]   -- {b}:agg:{old id}
local index_key = KEYS[3]        -- {b}:key:{canonical}
local marker_key = KEYS[4]       -- {b}:refresh:{canonical}
local queue_key = KEYS[5]        -- {b}:{farm}:queue
local refreshes_key = KEYS[6]    -- {b}:{farm}:refreshes
local farms_key = KEYS[7]        -- {b}:farms
local live_key = KEYS[8]         -- {b}:live
local record_key = KEYS[9]       -- {b}:agg:{new id}
local epoch_key = KEYS[10]       -- {b}:epoch
local version_key = KEYS[11]     -- {b}:version
local fair_key = KEYS[12]        -- {b}:{farm}:fair
local admission_key = KEYS[13]   -- {all}:admission, with mode `inline` only

local old_id = ARGV[1]
local id = ARGV[2]
local json = ARGV[3]             -- the new record
local farm = ARGV[4]
local min_hits = tonumber(ARGV[5])
local max_live = tonumber(ARGV[6])
local max_farms = tonumber(ARGV[7])
local id_epoch = ARGV[8]
local marker_ms = ARGV[9]        -- how long the marker lives
local now = tonumber(ARGV[10])   -- ms
local mode = ARGV[11]            -- inline | given
local live_total = ARGV[12]      -- the sums the replica read (mode `given`)
local farms_total = ARGV[13]
local bucket = ARGV[14]

-- Answers {the verdict: queued, gone, cold, backlog, farms, live or epoch; after `queued`, the
-- bucket's live, farms and version}.
if redis.call('GET', epoch_key) ~= id_epoch then return {'epoch'} end
if not redis.call('ZSCORE', due_key, old_id) then return {'gone'} end
local f = redis.call('HMGET', old_record_key, 'state', 'expire_ms', 'hits')
if f[1] ~= 'COMPLETED' or tonumber(f[2] or '0') <= now or redis.call('GET', index_key) ~= old_id
    or redis.call('EXISTS', marker_key) == 1 then
    redis.call('ZREM', due_key, old_id)
    return {'gone'}
end
if tonumber(f[3] or '0') < min_hits then return {'cold'} end
local queued = redis.call('LLEN', queue_key)
if queued > redis.call('SCARD', refreshes_key) then return {'backlog'} end
local live, farms = totals(mode, admission_key, live_total, farms_total)
if queued == 0 and redis.call('SISMEMBER', farms_key, farm) == 0 and farms >= max_farms then return {'farms'} end
if live >= max_live then return {'live'} end
redis.call('ZREM', due_key, old_id)
-- Only refreshes wait on the farm (else `backlog`): its place, after them all, is the back.
redis.call('RPUSH', queue_key, id)
redis.call('HSET', fair_key, 'p:' .. id, '2 0')
redis.call('SADD', refreshes_key, id)
redis.call('SADD', farms_key, farm)
redis.call('INCR', live_key)
redis.call('HSET', record_key, 'json', json, 'state', 'QUEUED', 'farm', farm, 'index', index_key, 'hits', 0)
redis.call('SET', marker_key, id, 'PX', marker_ms)
local counts = recount(farms_key, live_key, version_key, mode == 'inline' and admission_key or nil, bucket)
return {'queued', counts[1], counts[2], counts[3]}
