-- A completed result's stored rows when a replica's near-cache can hold them; else only
-- their size (the replica then reads them page by page: rows_page.lua).
local rows_key = KEYS[1]        -- rows:{id}

local most = tonumber(ARGV[1])  -- the bytes the near-cache may hold

-- Answers nil when the rows are gone, their size when larger than `most`, else the rows.
local size = redis.call('STRLEN', rows_key)
if size == 0 then return nil end
if size > most then return size end
return redis.call('GET', rows_key)
