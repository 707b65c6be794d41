-- Puts back the rows of a COMPLETED record that Redis lost. Rows are immutable: only for a
-- COMPLETED record still valid, never over rows present.
local record_key = KEYS[1]    -- agg:{id}
local rows_key = KEYS[2]      -- rows:{id}

local rows = ARGV[1]
local expire_ms = ARGV[2]

-- Answers 1 when put back, 0 otherwise.
if redis.call('HGET', record_key, 'state') ~= 'COMPLETED' then return 0 end
if tonumber(expire_ms) <= now_ms() then return 0 end
if redis.call('SET', rows_key, rows, 'PXAT', expire_ms, 'NX') then return 1 end
return 0
