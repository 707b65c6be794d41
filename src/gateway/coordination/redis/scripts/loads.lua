-- What every farm with work holds: its queue's length and whether its head runs.
local farms_key = KEYS[1]      -- farms

local prefix = ARGV[1]         -- the key prefix
local record_prefix = ARGV[2]

-- Answers a flat list: farm, queued (the queue's length), running (0 or 1), ...
local out = {}
for _, farm in ipairs(redis.call('SMEMBERS', farms_key)) do
    local queue_key = prefix .. '{' .. farm .. '}:queue'
    local head = redis.call('LINDEX', queue_key, 0)
    local running = 0
    if head and redis.call('HGET', record_prefix .. head, 'state') == 'RUNNING' then running = 1 end
    table.insert(out, farm)
    table.insert(out, redis.call('LLEN', queue_key))
    table.insert(out, running)
end
return out
