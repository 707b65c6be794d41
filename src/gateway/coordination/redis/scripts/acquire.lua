-- Takes a farm's lease if nobody holds it; its token is the farm's next fence.
local lease_key = KEYS[1]   -- {farm}:lease: token:holder, expiring with the lease
local fence_key = KEYS[2]   -- {farm}:fence: the newest token

local holder = ARGV[1]
local ttl_ms = ARGV[2]

-- Answers the token, or nil when the lease is held.
if redis.call('EXISTS', lease_key) == 1 then return false end
local token = redis.call('INCR', fence_key)
redis.call('SET', lease_key, token .. ':' .. holder, 'PX', ttl_ms)
return token
