#!lua flags=allow-oom
-- The generation of the shared state: made anew when it is missing (Redis restarted empty, or
-- was flushed) and when the server is not the one it was made on (a restart or a failover,
-- which may have lost recent writes: ids minted in the lost window must answer lost).
local epoch_key = KEYS[1]   -- epoch
local server_key = KEYS[2]  -- server: the run_id the epoch was made on

local fresh = ARGV[1]       -- a random epoch, taken when a new one begins
local run_id = ARGV[2]      -- this server's run_id

-- Answers the epoch.
local e = redis.call('GET', epoch_key)
local server = redis.call('GET', server_key)
if e and (server == run_id or not server) then
    if not server then redis.call('SET', server_key, run_id) end
    return e
end
redis.call('SET', epoch_key, fresh)
redis.call('SET', server_key, run_id)
return fresh
