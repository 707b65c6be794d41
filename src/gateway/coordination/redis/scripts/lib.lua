-- Shared by every script: scripts.rs puts this before each one.

-- Redis's own clock in milliseconds: the one clock every replica agrees on.
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Redis's own clock in microseconds.
local function now_us()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Whether a record's state is queued or running (it sits in its farm's queue).
local function is_active(state)
    return state == 'QUEUED' or state == 'RUNNING'
end

-- An integer as Redis stores it (Lua would write a large one as `1.8e+15`).
local function int(n)
    return string.format('%.0f', n)
end

-- Publishes `message` on the changes channel with PUBLISH, or SPUBLISH on a cluster's
-- per-bucket channel (keys.rs).
local function publish(command, channel, message)
    redis.call(command, channel, message)
end

-- Writes a bucket's counts into the admission sums (`{all}:admission`) unless a newer version
-- of them is there already: writers of several replicas may arrive out of order.
local function tally(admission_key, bucket, live, farms, version)
    local f = redis.call('HMGET', admission_key, 'v:' .. bucket, 'l:' .. bucket, 'f:' .. bucket)
    if f[1] and tonumber(f[1]) >= version then return 0 end
    redis.call('HSET', admission_key, 'v:' .. bucket, int(version), 'l:' .. bucket, live, 'f:' .. bucket, farms)
    redis.call('HINCRBY', admission_key, 'live', live - tonumber(f[2] or '0'))
    redis.call('HINCRBY', admission_key, 'farms', farms - tonumber(f[3] or '0'))
    return 1
end

-- After a bucket's counts changed: their new version (Redis's clock in µs, and never less
-- than the last one plus one), tallied at once when the admission key is one of the script's
-- (a single Redis); on a cluster the replica tallies them next. Answers {live, farms, version}.
local function recount(farms_key, live_key, version_key, admission_key, bucket)
    local version = math.max(now_us(), tonumber(redis.call('GET', version_key) or '0') + 1)
    redis.call('SET', version_key, int(version))
    local live = tonumber(redis.call('GET', live_key) or '0')
    local farms = redis.call('SCARD', farms_key)
    if admission_key then tally(admission_key, bucket, live, farms, version) end
    return {live, farms, version}
end

-- The sums the bounds are checked against: read from the admission key when it is one of the
-- script's (mode `inline`), else as the replica read them (mode `given`). Answers live, farms.
local function totals(mode, admission_key, live_arg, farms_arg)
    if mode == 'inline' then
        local t = redis.call('HMGET', admission_key, 'live', 'farms')
        return tonumber(t[1] or '0'), tonumber(t[2] or '0')
    end
    return tonumber(live_arg), tonumber(farms_arg)
end
