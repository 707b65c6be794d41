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
