#!lua flags=allow-oom
-- The completed results of a family (farm, kind, timezone, period, groups) that may contain a
-- request: of the `most` that start nearest before the request's start (at or before it), those
-- whose window covers the request's (`policy::covers`) and that are valid long enough, most
-- validity left first. The replica then applies `derive::contains` to their records. Only
-- shrinks the index (expired entries leave it), so it runs while Redis's memory is full.
local by_start = KEYS[1]        -- {b}:family:{family}: members `start:end:expire:id` (ms), scored by start
local by_expiry = KEYS[2]       -- {b}:family-expiry:{family}: the same members, scored by expiry

local valid_from = tonumber(ARGV[1])  -- the least expiry a result may have to be looked at (ms)
local q_start = tonumber(ARGV[2])
local q_end = tonumber(ARGV[3])
local most = tonumber(ARGV[4])        -- policy::CONTAINING_LOOKED_AT

-- Answers the ids.
prune_family(by_start, by_expiry)
local covering = {}
for _, member in ipairs(redis.call('ZREVRANGEBYSCORE', by_start, q_start, '-inf', 'LIMIT', 0, most)) do
    local e, x, id = string.match(member, '^%-?%d+:(%-?%d+):(%-?%d+):(.+)$')
    if e and q_end <= tonumber(e) and tonumber(x) >= valid_from then
        covering[#covering + 1] = {tonumber(x), id}
    end
end
table.sort(covering, function(a, b) return a[1] > b[1] end)
local ids = {}
for i, c in ipairs(covering) do ids[i] = c[2] end
return ids
