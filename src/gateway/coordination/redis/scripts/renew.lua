#!lua flags=allow-oom
-- Extends a lease while it is still held under the caller's token (and its fence with it).
local lease_key = KEYS[1]   -- {farm}:lease
local fence_key = KEYS[2]   -- {farm}:fence

local owner = ARGV[1]       -- token:holder
local ttl_ms = ARGV[2]
local fence_ms = ARGV[3]    -- how long the fence outlives the lease

-- Answers 1 when renewed, 0 when the lease is lost.
if redis.call('GET', lease_key) == owner then
    redis.call('PEXPIRE', lease_key, ttl_ms)
    redis.call('PEXPIRE', fence_key, ttl_ms + fence_ms)
    return 1
end
return 0
