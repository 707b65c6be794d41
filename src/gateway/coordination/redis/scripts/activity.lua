-- Appends events to an aggregation's timeline (its first event kept when it is full) and the
-- Ended ones to its farm's recent list (newest first). History for the operator console: no
-- rule of the policy; refused like any write while Redis's memory is full.
local timeline_key = KEYS[1]   -- {b}:activity:{id}
local recent_key = KEYS[2]     -- {b}:{farm}:recent

local max_events = tonumber(ARGV[1])
local timeline_ttl_ms = ARGV[2]
local max_recent = tonumber(ARGV[3])
local recent_ttl_ms = ARGV[4]
-- ARGV[5], ARGV[6], ...: each event's JSON, then 1 when it is an Ended event, else 0.

local ended = false
for i = 5, #ARGV, 2 do
    redis.call('RPUSH', timeline_key, ARGV[i])
    if ARGV[i + 1] == '1' then
        redis.call('LPUSH', recent_key, ARGV[i])
        ended = true
    end
end
-- Over the limit: the second event on goes, the first (Queued) stays.
local excess = redis.call('LLEN', timeline_key) - max_events
for _ = 1, excess do
    redis.call('LSET', timeline_key, 1, '\0dropped')
    redis.call('LREM', timeline_key, 1, '\0dropped')
end
redis.call('PEXPIRE', timeline_key, timeline_ttl_ms)
if ended then
    redis.call('LTRIM', recent_key, 0, max_recent - 1)
    redis.call('PEXPIRE', recent_key, recent_ttl_ms)
end
return 1
