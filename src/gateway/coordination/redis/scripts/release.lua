#!lua flags=allow-oom
-- Drops a lease if it is still held under the caller's token.
local lease_key = KEYS[1]   -- {farm}:lease

local owner = ARGV[1]       -- token:holder

-- Answers 1 when dropped, 0 otherwise.
if redis.call('GET', lease_key) == owner then return redis.call('DEL', lease_key) end
return 0
