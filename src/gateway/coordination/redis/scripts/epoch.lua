-- The generation of the shared state: made when missing, so a Redis that restarted empty has
-- a new one.
local epoch_key = KEYS[1]   -- epoch

local fresh = ARGV[1]       -- a random epoch, taken when there is none

-- Answers the epoch.
local e = redis.call('GET', epoch_key)
if e then return e end
redis.call('SET', epoch_key, fresh)
return fresh
