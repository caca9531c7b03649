-- Library: complete_if_done(counts, meta, active, events, now, batch_id, c)
-- When every job of the batch is final, stamp its finished_at (once), drop it from the active set and
-- push its id onto the finished-events list that webhooks are delivered from.
--   counts    the batch's counts hash (total, done, failed, cancelled)
--   meta      the batch's metadata hash (finished_at)
--   active    the set of active batch ids
--   events    the list of finished batch ids
--   now       the time to stamp, seconds since the epoch
--   batch_id  the batch's id
--   c         optional: {total, done, failed, cancelled} as the caller just wrote them (not read again)
local function complete_if_done(counts, meta, active, events, now, batch_id, c)
  c = c or redis.call('HMGET', counts, 'total', 'done', 'failed', 'cancelled')
  local finished = tonumber(c[2] or 0) + tonumber(c[3] or 0) + tonumber(c[4] or 0)
  if c[1] and finished >= tonumber(c[1]) and redis.call('HEXISTS', meta, 'finished_at') == 0 then
    redis.call('HSET', meta, 'finished_at', now)
    redis.call('SREM', active, batch_id)
    redis.call('RPUSH', events, batch_id)
  end
end
