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

-- The fair order of a farm's queue (coordination::policy: Place, place, slot, joined_place,
-- reached_head), kept in the farm's hash `{b}:{farm}:fair`: `p:{id}` each queued id's place
-- ("class turn"), `o:{id}` the caller whose Start queued it, `v:{class}` each class's virtual
-- time, `n:{class}:{caller}` each caller's next turn. Deleted when the queue empties.

-- HMGET of `fields` of `key`, in slices (Lua's unpack takes a few thousand values at most).
local function hmget_all(key, fields)
    local out = {}
    for from = 1, #fields, 1000 do
        local slice = {}
        for i = from, math.min(from + 999, #fields) do slice[#slice + 1] = fields[i] end
        local got = redis.call('HMGET', key, unpack(slice))
        for i = 1, #slice do out[from + i - 1] = got[i] end
    end
    return out
end

-- The place of queued `id`: {class, turn}. An id without one is a refresh no caller joined
-- when the farm's refreshes name it, else (queued by an earlier version) a caller's, first.
local function place_of(refreshes_key, id, p)
    if p then
        local class, turn = string.match(p, '^(%d+) (%d+)$')
        if class then return tonumber(class), tonumber(turn) end
    end
    if refreshes_key and redis.call('SISMEMBER', refreshes_key, id) == 1 then return 2, 0 end
    return 0, 0
end

-- Whether place (c1, t1) is later than (c2, t2).
local function later(c1, t1, c2, t2)
    return c1 > c2 or (c1 == c2 and t1 > t2)
end

-- Puts `id` at place (class, turn) in the queue (policy::slot): after the head and after every
-- waiting id not later than it. Answers its index.
local function insert_at(queue_key, fair_key, refreshes_key, id, class, turn)
    local len = redis.call('LLEN', queue_key)
    redis.call('HSET', fair_key, 'p:' .. id, class .. ' ' .. int(turn))
    if len == 0 then
        redis.call('RPUSH', queue_key, id)
        return 0
    end
    local waiting = redis.call('LRANGE', queue_key, 1, -1)
    if #waiting > 0 then
        local fields = {}
        for i, other in ipairs(waiting) do fields[i] = 'p:' .. other end
        local places = hmget_all(fair_key, fields)
        for i, other in ipairs(waiting) do
            local c, t = place_of(refreshes_key, other, places[i])
            if later(c, t, class, turn) then
                redis.call('LINSERT', queue_key, 'BEFORE', other, id)
                return i
            end
        end
    end
    redis.call('RPUSH', queue_key, id)
    return len
end

-- The place of `caller`'s aggregation of `class` (policy::place), and the caller's next turn
-- after it; arrival order when queueing is not fair.
local function caller_place(fair_key, fair, class, caller)
    if not fair then return 0, 0, nil end
    local f = redis.call('HMGET', fair_key, 'v:' .. class, 'n:' .. class .. ':' .. caller)
    local turn = math.max(tonumber(f[1] or '0'), tonumber(f[2] or '0'))
    return class, turn, turn + 1
end

-- Sets `caller`'s next turn in `class`.
local function charge(fair_key, class, caller, next_turn)
    if next_turn and class < 2 then redis.call('HSET', fair_key, 'n:' .. class .. ':' .. caller, int(next_turn)) end
end

-- Aggregations `caller`'s Starts have waiting behind the head.
local function waiting_of(queue_key, fair_key, caller)
    local waiting = redis.call('LRANGE', queue_key, 1, -1)
    if #waiting == 0 then return 0 end
    local fields = {}
    for i, other in ipairs(waiting) do fields[i] = 'o:' .. other end
    local n = 0
    local owners = hmget_all(fair_key, fields)
    for i = 1, #fields do
        if owners[i] == caller then n = n + 1 end
    end
    return n
end

-- Takes `id` off the farm's queue with its place (policy::reached_head for the next head when
-- it was the head; an emptied queue forgets its turns). Answers how many were removed.
local function leave_queue(queue_key, fair_key, refreshes_key, id)
    local was_head = redis.call('LINDEX', queue_key, 0) == id
    local removed = redis.call('LREM', queue_key, 0, id)
    if removed == 0 then return 0 end
    redis.call('HDEL', fair_key, 'p:' .. id, 'o:' .. id)
    if redis.call('LLEN', queue_key) == 0 then
        redis.call('DEL', fair_key)
    elseif was_head then
        local head = redis.call('LINDEX', queue_key, 0)
        local class, turn = place_of(refreshes_key, head, redis.call('HGET', fair_key, 'p:' .. head))
        if class < 2 then
            local vt = tonumber(redis.call('HGET', fair_key, 'v:' .. class) or '0')
            if turn > vt then redis.call('HSET', fair_key, 'v:' .. class, int(turn)) end
        end
    end
    return removed
end

-- Takes expired results out of a family's index (containing.lua): from the set by expiry and
-- the set by start, which hold the same members; at most 256 a call.
local function prune_family(by_start, by_expiry)
    local gone = redis.call('ZRANGEBYSCORE', by_expiry, '-inf', now_ms(), 'LIMIT', 0, 256)
    if #gone > 0 then
        redis.call('ZREM', by_start, unpack(gone))
        redis.call('ZREM', by_expiry, unpack(gone))
    end
end
