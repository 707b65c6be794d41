-- Adds one run to a farm's run model: a moving average of the seconds per unit of size.
-- Mirrors coordination::run_model::RunModel::observe.
local model_key = KEYS[1]          -- {farm}:model

local rate = tonumber(ARGV[1])     -- seconds per unit of this run
local smoothing = tonumber(ARGV[2]) -- the weight of the newest run

-- Answers how many runs the model has seen.
local m = redis.call('HMGET', model_key, 'seconds_per_unit', 'runs')
if m[1] then
    local previous = tonumber(m[1])
    rate = previous + smoothing * (rate - previous)
end
local runs = tonumber(m[2] or '0') + 1
redis.call('HSET', model_key, 'seconds_per_unit', string.format('%.17g', rate), 'runs', runs)
return runs
