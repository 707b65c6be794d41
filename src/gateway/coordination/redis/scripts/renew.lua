-- Extends a lease while it is still held under the caller's token.
local lease_key = KEYS[1]   -- {farm}:lease

local owner = ARGV[1]       -- token:holder
local ttl_ms = ARGV[2]

-- Answers 1 when renewed, 0 when the lease is lost.
if redis.call('GET', lease_key) == owner then
    redis.call('PEXPIRE', lease_key, ttl_ms)
    return 1
end
return 0
