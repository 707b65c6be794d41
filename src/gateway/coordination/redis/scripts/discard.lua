#!lua flags=allow-oom
-- Takes an id whose record is missing or unreadable off its farm's queue, fenced like
-- update.lua, so the farm moves on. An unreadable record stays (marked FAILED, so no script
-- counts it active) until it expires, and its id answers why; the key it answered is freed
-- (the replica read which key that is first, to declare it; `moved` when that changed).
local fence_key = KEYS[1]       -- {b}:{farm}:fence
local record_key = KEYS[2]      -- {b}:agg:{id}
local queue_key = KEYS[3]       -- {b}:{farm}:queue
local farms_key = KEYS[4]       -- {b}:farms
local live_key = KEYS[5]        -- {b}:live
local version_key = KEYS[6]     -- {b}:version
local index_key = KEYS[7]       -- {b}:key:{canonical} the record names, else the record's key
local fair_key = KEYS[8]        -- {b}:{farm}:fair
local admission_key = KEYS[9]   -- {all}:admission, with mode `inline` only

local token = ARGV[1]
local id = ARGV[2]
local farm = ARGV[3]
local keep_ms = ARGV[4]         -- how long an unreadable record stays
local channel = ARGV[5]
local farm_topic = ARGV[6]
local read_index = ARGV[7]      -- the key the record named when the replica read it ('' none)
local mode = ARGV[8]            -- inline | given
local bucket = ARGV[9]
local publish_command = ARGV[10]

-- Answers {1 when it is off the queue (now or already), 0 when fenced, -1 when moved; after
-- taking it off, the bucket's live, farms and version}.
if redis.call('GET', fence_key) ~= token then return {0} end
if (redis.call('HGET', record_key, 'index') or '') ~= read_index then return {-1} end
if leave_queue(queue_key, fair_key, nil, id) == 0 then return {1} end
if redis.call('LLEN', queue_key) == 0 then redis.call('SREM', farms_key, farm) end
if redis.call('DECR', live_key) < 0 then redis.call('SET', live_key, 0) end
if redis.call('EXISTS', record_key) == 1 then
    if read_index ~= '' and redis.call('GET', index_key) == id then redis.call('DEL', index_key) end
    redis.call('HSET', record_key, 'state', 'FAILED')
    redis.call('PEXPIRE', record_key, keep_ms)
end
publish(publish_command, channel, id)
publish(publish_command, channel, farm_topic)
local counts = recount(farms_key, live_key, version_key, mode == 'inline' and admission_key or nil, bucket)
return {1, counts[1], counts[2], counts[3]}
