#!lua flags=allow-oom
-- A caller's token bucket shared by every replica, as a GCRA (like gcra.lua), from which a
-- replica takes tokens in batches: up to `want` tokens that are due now, or how long until one
-- is.
local bucket_key = KEYS[1]           -- caller:{operation}:{caller}: the theoretical arrival time, µs

local interval = tonumber(ARGV[1])   -- emission interval, µs
local tolerance = tonumber(ARGV[2])  -- interval × (burst − 1), µs
local want = tonumber(ARGV[3])

-- Answers {tokens taken, µs until one is due (when none were)}.
local now = now_us()
local tat = tonumber(redis.call('GET', bucket_key) or '0')
if tat < now then tat = now end
local due = math.floor((now + tolerance - tat) / interval) + 1
if due < 1 then return {0, math.ceil(tat - now - tolerance)} end
local taken = math.min(due, want)
local next_tat = tat + taken * interval
redis.call('SET', bucket_key, string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
return {taken, 0}
