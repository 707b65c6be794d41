#!lua flags=allow-oom
-- Leaves an upstream aggregation that a holder started but could not record under its lease
-- with the aggregation, for the farm's next holder to adopt instead of starting another.
-- Unfenced (the writer has lost its lease), so it writes only an `offer` field beside the
-- record, and only while the aggregation is active; the holder reads it before each Start.
local record_key = KEYS[1]  -- agg:{id}

local offer = ARGV[1]       -- the offer (wire.rs)

-- Answers 1 when left, 0 when the aggregation is no longer active.
if not is_active(redis.call('HGET', record_key, 'state')) then return 0 end
redis.call('HSET', record_key, 'offer', offer)
return 1
