-- The refresh-ahead candidates: COMPLETED results expiring by a time that still answer their
-- key and are popular enough, with their hits and records. Those that no longer answer their
-- key (expired ones among them) leave the due set when looked at; housekeeping drops every
-- expired one. Records of results not popular enough are not read (`policy::refresh_verdict`'s
-- Cold: they may still become popular, so they stay).
local due_key = KEYS[1]          -- due: COMPLETED ids by expiry

local now = tonumber(ARGV[1])    -- ms
local due_by = ARGV[2]           -- ms
local record_prefix = ARGV[3]
local most = tonumber(ARGV[4])   -- candidates looked at
local min_hits = tonumber(ARGV[5])

-- Answers a flat list: id, hits, json, id, hits, json, ...
local ids = redis.call('ZRANGEBYSCORE', due_key, '-inf', due_by, 'LIMIT', 0, most)
local out = {}
for _, id in ipairs(ids) do
    local record_key = record_prefix .. id
    local f = redis.call('HMGET', record_key, 'state', 'expire_ms', 'hits', 'index')
    local alive = f[1] == 'COMPLETED' and tonumber(f[2] or '0') > now and f[4] and redis.call('GET', f[4]) == id
    if not alive then
        redis.call('ZREM', due_key, id)
    elseif tonumber(f[3] or '0') >= min_hits then
        table.insert(out, id)
        table.insert(out, tonumber(f[3] or '0'))
        table.insert(out, redis.call('HGET', record_key, 'json'))
    end
end
return out
