-- Refresh a worker's registration, if it is still there.
-- KEYS[1] worker   the worker's registration hash (it carries a TTL)
-- ARGV[1] ttl_ms   the registration's new time to live, in milliseconds
-- ARGV[2..]        field, value pairs to set (last_seen, jobs held, ...)
-- Returns 1 when refreshed; 0 when the entry had expired: nothing is written, and the worker registers
-- again (a partial entry would show a worker with no name or class).
local worker, ttl_ms = KEYS[1], ARGV[1]
if redis.call('EXISTS', worker) == 0 then return 0 end
redis.call('HSET', worker, unpack(ARGV, 2))
redis.call('PEXPIRE', worker, ttl_ms)
return 1
