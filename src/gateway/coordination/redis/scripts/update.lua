#!lua flags=allow-oom
-- Writes the next state of an active aggregation, if the writer's lease is still the farm's
-- newest (fenced) and the record is still active.
local fence_key = KEYS[1]   -- {b}:{farm}:fence: the farm's newest lease token
local record_key = KEYS[2]  -- {b}:agg:{id}

local token = ARGV[1]       -- the writer's lease token
local json = ARGV[2]        -- the record
local state = ARGV[3]       -- its state
local channel = ARGV[4]     -- the changes channel
local id = ARGV[5]
local farm_topic = ARGV[6]  -- what wakes the farm's watchers
local publish_command = ARGV[7]

-- Answers 1 when written, 0 when fenced.
if redis.call('GET', fence_key) ~= token then return 0 end
if not is_active(redis.call('HGET', record_key, 'state')) then return 0 end
redis.call('HSET', record_key, 'json', json, 'state', state)
publish(publish_command, channel, id)
publish(publish_command, channel, farm_topic)
return 1
