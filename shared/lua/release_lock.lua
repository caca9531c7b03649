-- Release a lock only if it is still the caller's: a lock that expired and was taken by another stays.
-- KEYS[1]  the lock
-- ARGV[1]  the token the caller set it to
-- Returns 1 when released, 0 when the lock was not the caller's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
