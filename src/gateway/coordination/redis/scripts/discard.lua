#!lua flags=allow-oom
-- Takes an id whose record is missing or unreadable off its farm's queue, fenced like
-- update.lua, so the farm moves on. An unreadable record stays (marked FAILED, so no script
-- counts it active) until it expires, and its id answers why; the key it answered is freed.
local fence_key = KEYS[1]   -- {farm}:fence
local record_key = KEYS[2]  -- agg:{id}
local queue_key = KEYS[3]   -- {farm}:queue
local farms_key = KEYS[4]   -- farms
local live_key = KEYS[5]    -- live

local token = ARGV[1]
local id = ARGV[2]
local farm = ARGV[3]
local keep_ms = ARGV[4]     -- how long an unreadable record stays
local channel = ARGV[5]
local farm_topic = ARGV[6]

-- Answers 1 when it is off the queue (now or already), 0 when fenced.
if redis.call('GET', fence_key) ~= token then return 0 end
if redis.call('LREM', queue_key, 0, id) == 0 then return 1 end
if redis.call('LLEN', queue_key) == 0 then redis.call('SREM', farms_key, farm) end
if redis.call('DECR', live_key) < 0 then redis.call('SET', live_key, 0) end
if redis.call('EXISTS', record_key) == 1 then
    local index_key = redis.call('HGET', record_key, 'index')
    if index_key and redis.call('GET', index_key) == id then redis.call('DEL', index_key) end
    redis.call('HSET', record_key, 'state', 'FAILED')
    redis.call('PEXPIRE', record_key, keep_ms)
end
redis.call('PUBLISH', channel, id)
redis.call('PUBLISH', channel, farm_topic)
return 1
