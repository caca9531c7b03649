-- Cancel a batch: every job not yet started is counted cancelled; workers skip their messages.
-- needs: complete_if_done
-- KEYS[1] counts    the batch's counts hash
-- KEYS[2] meta      the batch's metadata hash (cancelled)
-- KEYS[3] active    the set of active batch ids
-- KEYS[4] events    the list of finished batch ids
-- ARGV[1] now       seconds since the epoch
-- ARGV[2] batch_id  the batch's id
-- Returns how many jobs were cancelled, 0 when the batch was cancelled already, -1 for no such batch.
local counts, meta, active, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, batch_id = ARGV[1], ARGV[2]

if redis.call('EXISTS', meta) == 0 then return -1 end
if redis.call('HGET', meta, 'cancelled') == '1' then return 0 end
redis.call('HSET', meta, 'cancelled', '1')
local queued = tonumber(redis.call('HGET', counts, 'queued') or 0)
redis.call('HINCRBY', counts, 'cancelled', queued)
redis.call('HSET', counts, 'queued', 0)
for _, f in ipairs(redis.call('HKEYS', counts)) do
  if string.sub(f, 1, 7) == 'queued:' then redis.call('HSET', counts, f, 0) end
end
complete_if_done(counts, meta, active, events, now, batch_id)
return queued
