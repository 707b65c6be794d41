-- The refresh-ahead candidates: COMPLETED results expiring by a time that still answer their
-- key, with their hits and records. Those that no longer can leave the due set.
local due_key = KEYS[1]          -- due: COMPLETED ids by expiry

local now = tonumber(ARGV[1])    -- ms
local due_by = ARGV[2]           -- ms
local record_prefix = ARGV[3]
local most = tonumber(ARGV[4])   -- candidates looked at

-- Answers a flat list: id, hits, json, id, hits, json, ...
local ids = redis.call('ZRANGEBYSCORE', due_key, '-inf', due_by, 'LIMIT', 0, most)
local out = {}
for _, id in ipairs(ids) do
    local f = redis.call('HMGET', record_prefix .. id, 'state', 'expire_ms', 'hits', 'index', 'json')
    local alive = f[1] == 'COMPLETED' and tonumber(f[2] or '0') > now and f[4] and redis.call('GET', f[4]) == id
    if alive then
        table.insert(out, id)
        table.insert(out, tonumber(f[3] or '0'))
        table.insert(out, f[5])
    else
        redis.call('ZREM', due_key, id)
    end
end
return out
