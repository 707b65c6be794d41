-- Some rows of a stored row block (RowBlock::to_bytes: the row count, each row's end as a
-- little-endian u32, then the rows), read without the rest: for results larger than a
-- replica's near-cache, served page by page.
local rows_key = KEYS[1]        -- rows:{id}

local first = tonumber(ARGV[1]) -- the first row wanted (from 0)
local last = tonumber(ARGV[2])  -- one past the last

-- Answers nil when the rows are gone, else {row count, the wanted rows' ends, where the first
-- of them starts, their bytes}.
local head = redis.call('GETRANGE', rows_key, 0, 3)
if #head < 4 then return nil end
local count = struct.unpack('<I4', head)
if last > count then last = count end
if first >= last then return {count, '', 0, ''} end
local header = 4 + 4 * count
local from = 4 + 4 * first      -- the first wanted row's end
local start = 0
if first > 0 then
    from = from - 4             -- and the end of the row before it: where it starts
    start = struct.unpack('<I4', redis.call('GETRANGE', rows_key, from, from + 3))
    from = from + 4
end
local ends = redis.call('GETRANGE', rows_key, from, 4 + 4 * last - 1)
local stop = struct.unpack('<I4', string.sub(ends, -4))
local bytes = ''
if stop > start then bytes = redis.call('GETRANGE', rows_key, header + start, header + stop - 1) end
return {count, ends, start, bytes}
