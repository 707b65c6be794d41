#!lua flags=allow-oom
-- A token bucket shared by every replica, as a GCRA: takes a token, or says how long until one
-- is due.
local rate_key = KEYS[1]             -- rate:{name}: the theoretical arrival time, µs

local interval = tonumber(ARGV[1])   -- emission interval, µs
local tolerance = tonumber(ARGV[2])  -- interval × (burst − 1), µs

-- Answers 0 when a token was taken, else the µs until one is due.
local now = now_us()
local tat = tonumber(redis.call('GET', rate_key) or '0')
if tat < now then tat = now end
local early = tat - now - tolerance
if early > 0 then return math.ceil(early) end
local next_tat = tat + interval
redis.call('SET', rate_key, string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
return 0
