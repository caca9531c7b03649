-- Library: stored_tier(jobs, index, fallback)
-- The size tier a queued job is counted under is the one stored with the batch, never the one a
-- message claims: a forged or malformed message must not skew the per-tier queued counts.
--   jobs      the batch's jobs hash (index -> job wire JSON)
--   index     the job's index
--   fallback  the tier to use when the stored job has none (an older batch)
local function stored_tier(jobs, index, fallback)
  local ok, job = pcall(cjson.decode, redis.call('HGET', jobs, index) or '')
  if ok and type(job) == 'table' and type(job.tier) == 'string' then return job.tier end
  return fallback
end
