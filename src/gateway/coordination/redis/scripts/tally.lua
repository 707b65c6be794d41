#!lua flags=allow-oom
-- Writes one bucket's counts into the admission sums, on a cluster (where the bucket's own
-- scripts cannot reach them) after each change and at housekeeping; lib.lua's tally.
local admission_key = KEYS[1]   -- {all}:admission

local bucket = ARGV[1]
local live = tonumber(ARGV[2])
local farms = tonumber(ARGV[3])
local version = tonumber(ARGV[4])

-- Answers 1 when written, 0 when a newer version was there.
return tally(admission_key, bucket, live, farms, version)
