-- Finish a job: record its final outcome once, and count it for the worker that rendered it.
-- needs: stored_tier, complete_if_done
-- KEYS[1] counts    the batch's counts hash
-- KEYS[2] states    the batch's states hash
-- KEYS[3] running   the batch's running hash
-- KEYS[4] failures  the batch's failures hash (index -> reason JSON)
-- KEYS[5] meta      the batch's metadata hash
-- KEYS[6] active    the set of active batch ids
-- KEYS[7] events    the list of finished batch ids
-- KEYS[8] jobs      the batch's jobs hash
-- KEYS[9] stats     optional: the rendering worker's stats hash (jobs_done, jobs_failed)
-- ARGV[1] index     the job's index
-- ARGV[2] outcome   done or failed
-- ARGV[3] reason    the failure reason JSON (stored for failed)
-- ARGV[4] now       seconds since the epoch
-- ARGV[5] batch_id  the batch's id
-- ARGV[6] tier      the message's tier, used only when the stored job has none
-- Returns 1 when recorded, 0 when the job was final already (or cancelled while queued), -1 for a job
-- not on record.
local counts, states, running, failures, meta, active, events, jobs, stats =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local index, outcome, reason, now, batch_id, tier = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

local st = redis.call('HGET', states, index)
if st == 'done' or st == 'failed' or st == 'cancelled' then return 0 end
if redis.call('HEXISTS', jobs, index) == 0 then return -1 end
if st == 'running' then
  redis.call('HINCRBY', counts, 'running', -1)
  redis.call('HDEL', running, index)
else
  if redis.call('HGET', meta, 'cancelled') == '1' then return 0 end
  redis.call('HINCRBY', counts, 'queued', -1)
  redis.call('HINCRBY', counts, 'queued:' .. stored_tier(jobs, index, tier), -1)
end
redis.call('HSET', states, index, outcome)
redis.call('HINCRBY', counts, outcome, 1)
if outcome == 'failed' then redis.call('HSET', failures, index, reason) end
if stats then redis.call('HINCRBY', stats, 'jobs_' .. outcome, 1) end
complete_if_done(counts, meta, active, events, now, batch_id)
return 1
