#!lua
-- Writes a terminal state (and a COMPLETED one's rows), takes the aggregation off its farm's
-- queue and keeps the record until its expiry plus a while; fenced like update.lua. A
-- completed refresh becomes what its key answers unless the key answers an active one (which
-- the replica read first, to declare its record; `moved` when that changed meanwhile).
local fence_key = KEYS[1]       -- {b}:{farm}:fence
local record_key = KEYS[2]      -- {b}:agg:{id}
local queue_key = KEYS[3]       -- {b}:{farm}:queue
local farms_key = KEYS[4]       -- {b}:farms
local live_key = KEYS[5]        -- {b}:live
local rows_key = KEYS[6]        -- {b}:rows:{id}
local index_key = KEYS[7]       -- {b}:key:{canonical}
local due_key = KEYS[8]         -- {b}:due: COMPLETED ids by expiry, for refresh-ahead
local marker_key = KEYS[9]      -- {b}:refresh:{canonical}
local refreshes_key = KEYS[10]  -- {b}:{farm}:refreshes
local version_key = KEYS[11]    -- {b}:version
local answering_key = KEYS[12]  -- {b}:agg:{the id the key named}, else this record's key
local fair_key = KEYS[13]       -- {b}:{farm}:fair
local family_key = KEYS[14]     -- {b}:family:{family}: COMPLETED results by start (containing.lua)
local family_expiry_key = KEYS[15] -- {b}:family-expiry:{family}: the same, by expiry
local admission_key = KEYS[16]  -- {all}:admission, with mode `inline` only

local token = ARGV[1]
local json = ARGV[2]
local state = ARGV[3]
local expire_ms = tonumber(ARGV[4])
local data_ms = ARGV[5]
local rows = ARGV[6]            -- empty: none
local farm = ARGV[7]
local channel = ARGV[8]
local id = ARGV[9]
local keep_ms = tonumber(ARGV[10])  -- how long the record outlives its result
local refresh = ARGV[11] == '1'
local farm_topic = ARGV[12]
local read_answering = ARGV[13] -- the id the key named when the replica read it ('' none)
local mode = ARGV[14]           -- inline | given
local bucket = ARGV[15]
local publish_command = ARGV[16]
local family_member = ARGV[17]  -- `start:end:expire:id` (ms); '' for a result not to index
local family_start = ARGV[18]   -- its start (ms)

-- Answers {1 when written, 0 when fenced, -1 when moved; then the bucket's live, farms and
-- version}.
if redis.call('GET', fence_key) ~= token then return {0} end
if not is_active(redis.call('HGET', record_key, 'state')) then return {0} end
local answering = redis.call('GET', index_key)
if refresh and (answering or '') ~= read_answering then return {-1} end
local has_rows = 0
if rows ~= '' then has_rows = 1 end
redis.call('HSET', record_key, 'json', json, 'state', state, 'expire_ms', ARGV[4], 'data_ms', data_ms,
    'rows', has_rows)
local keep_until = expire_ms + keep_ms
redis.call('PEXPIREAT', record_key, keep_until)
if answering == id then redis.call('PEXPIREAT', index_key, keep_until) end
if has_rows == 1 and expire_ms > now_ms() then redis.call('SET', rows_key, rows, 'PXAT', expire_ms) end
if state == 'COMPLETED' then redis.call('ZADD', due_key, expire_ms, id) end
if state == 'COMPLETED' and family_member ~= '' then
    prune_family(family_key, family_expiry_key)
    redis.call('ZADD', family_key, family_start, family_member)
    redis.call('ZADD', family_expiry_key, expire_ms, family_member)
end
if refresh then
    if redis.call('GET', marker_key) == id then redis.call('DEL', marker_key) end
    redis.call('SREM', refreshes_key, id)
    local superseded = true
    if answering and answering ~= id then
        superseded = not is_active(redis.call('HGET', answering_key, 'state'))
    end
    if state == 'COMPLETED' and superseded then redis.call('SET', index_key, id, 'PXAT', keep_until) end
end
leave_queue(queue_key, fair_key, refreshes_key, id)
if redis.call('LLEN', queue_key) == 0 then redis.call('SREM', farms_key, farm) end
if redis.call('DECR', live_key) < 0 then redis.call('SET', live_key, 0) end
publish(publish_command, channel, id)
publish(publish_command, channel, farm_topic)
local counts = recount(farms_key, live_key, version_key, mode == 'inline' and admission_key or nil, bucket)
return {1, counts[1], counts[2], counts[3]}
