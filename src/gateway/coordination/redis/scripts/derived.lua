#!lua
-- Keeps a COMPLETED aggregation derived from another result, with its rows, until its expiry,
-- and makes it what its key answers as `policy::derived_takes_key` says: not over an active
-- aggregation, nor over a result valid as long. Never in a farm's queue: nothing to fence.
local record_key = KEYS[1]      -- {b}:agg:{id}
local rows_key = KEYS[2]        -- {b}:rows:{id}
local index_key = KEYS[3]       -- {b}:key:{canonical}
local answering_key = KEYS[4]   -- {b}:agg:{the id the key named}, else this record's key

local json = ARGV[1]
local expire_ms = tonumber(ARGV[2])
local data_ms = ARGV[3]
local rows = ARGV[4]
local id = ARGV[5]
local keep_ms = tonumber(ARGV[6])   -- how long the record outlives its result
local read_answering = ARGV[7]      -- the id the key named when the replica read it ('' none)
local farm = ARGV[8]

-- Answers 1 when kept, -1 when what the key names changed since the replica read it.
local answering = redis.call('GET', index_key)
if (answering or '') ~= read_answering then return -1 end
local keep_until = expire_ms + keep_ms
redis.call('HSET', record_key, 'json', json, 'state', 'COMPLETED', 'farm', farm, 'index', index_key,
    'expire_ms', ARGV[2], 'data_ms', data_ms, 'rows', 1, 'hits', 0)
redis.call('PEXPIREAT', record_key, keep_until)
redis.call('SET', rows_key, rows, 'PXAT', expire_ms)
local active, answering_expire = false, nil
if answering then
    local fields = redis.call('HMGET', answering_key, 'state', 'expire_ms')
    active = is_active(fields[1])
    answering_expire = tonumber(fields[2] or '')
end
if not active and (answering_expire == nil or answering_expire < expire_ms) then
    redis.call('SET', index_key, id, 'PXAT', keep_until)
end
return 1
