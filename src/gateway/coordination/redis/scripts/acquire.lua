#!lua flags=allow-oom
-- Takes a farm's lease if nobody holds it; its token is the farm's next fence.
--
-- A token is the larger of the last one plus one and Redis's clock in microseconds: after
-- Redis lost writes (a failover to a lagging replica, a restart from an older snapshot) the
-- last token may be an older one, but the clock has moved on, so the new token is still larger
-- than every token handed out before, and a holder whose lease was lost is fenced. The fence
-- expires a day after the last lease, for the same reason.
local lease_key = KEYS[1]   -- {farm}:lease: token:holder, expiring with the lease
local fence_key = KEYS[2]   -- {farm}:fence: the newest token

local holder = ARGV[1]
local ttl_ms = ARGV[2]
local fence_ms = ARGV[3]    -- how long the fence outlives the lease

-- Answers the token, or nil when the lease is held.
if redis.call('EXISTS', lease_key) == 1 then return false end
local last = tonumber(redis.call('GET', fence_key) or '0')
local token = math.max(last + 1, now_us())
redis.call('SET', fence_key, string.format('%d', token), 'PX', ttl_ms + fence_ms)
redis.call('SET', lease_key, string.format('%d', token) .. ':' .. holder, 'PX', ttl_ms)
return token
