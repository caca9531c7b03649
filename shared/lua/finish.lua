-- Finish a job: record its final outcome once, count it for the worker that rendered it, and fold
-- its render time into that worker's speed.
-- needs: stored_tier, complete_if_done
-- KEYS[1] counts    the batch's counts hash
-- KEYS[2] states    the batch's states hash
-- KEYS[3] running   the batch's running hash
-- KEYS[4] failures  the batch's failures hash (index -> reason JSON)
-- KEYS[5] meta      the batch's metadata hash
-- KEYS[6] active    the set of active batch ids
-- KEYS[7] events    the list of finished batch ids
-- KEYS[8] jobs      the batch's jobs hash
-- KEYS[9] stats     optional: the rendering worker's stats hash (jobs_done, jobs_failed, s_per_image)
-- ARGV[1] index     the job's index
-- ARGV[2] outcome   done or failed
-- ARGV[3] reason    the failure reason JSON (stored for failed)
-- ARGV[4] now       seconds since the epoch
-- ARGV[5] batch_id  the batch's id
-- ARGV[6] tier      the message's tier, used only when the stored job has none
-- ARGV[7] sample    seconds per 1024x1024 8-step image of this render, or '' (a failure, no render)
-- ARGV[8] weight    the moving average's weight of the newest sample
-- Returns 1 when recorded, 0 when the job was final already (or cancelled while queued), -1 for a job
-- not on record.
--
-- A running job (the usual path) takes seven commands: the counts are read once and written once,
-- and the same counts tell whether the batch is complete.
local counts, states, running, failures, meta, active, events, jobs, stats =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local index, outcome, reason, now, batch_id, tier, sample, weight =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])

local st = redis.call('HGET', states, index)
if st == 'done' or st == 'failed' or st == 'cancelled' then return 0 end
local c
if st == 'running' then
  -- A running job was on record when it started.
  c = redis.call('HMGET', counts, 'total', 'done', 'failed', 'cancelled', 'running')
  c[5] = tonumber(c[5] or 0) - 1
  redis.call('HSET', counts, 'running', c[5], outcome, tonumber(c[outcome == 'done' and 2 or 3] or 0) + 1)
  redis.call('HDEL', running, index)
else
  if redis.call('HEXISTS', jobs, index) == 0 then return -1 end
  if redis.call('HGET', meta, 'cancelled') == '1' then return 0 end
  local queued_tier = 'queued:' .. stored_tier(jobs, index, tier)
  c = redis.call('HMGET', counts, 'total', 'done', 'failed', 'cancelled', 'queued', queued_tier)
  redis.call('HSET', counts, 'queued', tonumber(c[5] or 0) - 1, queued_tier, tonumber(c[6] or 0) - 1,
             outcome, tonumber(c[outcome == 'done' and 2 or 3] or 0) + 1)
end
if outcome == 'done' then c[2] = tonumber(c[2] or 0) + 1 else c[3] = tonumber(c[3] or 0) + 1 end
redis.call('HSET', states, index, outcome)
if outcome == 'failed' then redis.call('HSET', failures, index, reason) end
if stats then
  local s = redis.call('HMGET', stats, 'jobs_' .. outcome, 's_per_image')
  if sample ~= '' then
    local average = tonumber(sample)
    if s[2] then average = (1 - weight) * tonumber(s[2]) + weight * average end
    redis.call('HSET', stats, 'jobs_' .. outcome, tonumber(s[1] or 0) + 1, 's_per_image',
               string.format('%.4f', average))
  else
    redis.call('HSET', stats, 'jobs_' .. outcome, tonumber(s[1] or 0) + 1)
  end
end
complete_if_done(counts, meta, active, events, now, batch_id, c)
return 1
