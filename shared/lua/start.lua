-- Start a job: a worker claims it before rendering.
-- KEYS[1] counts    the batch's counts hash (queued, running, queued:<tier>)
-- KEYS[2] states    the batch's states hash (index -> running|done|failed|cancelled)
-- KEYS[3] running   the batch's running hash (index -> the claiming worker instance)
-- KEYS[4] meta      the batch's metadata hash (cancelled)
-- KEYS[5] attempts  the batch's attempts hash (index -> times started)
-- KEYS[6] jobs      the batch's jobs hash (index -> job wire JSON)
-- ARGV[1] index          the job's index
-- ARGV[2] claim          the worker instance, name/instance
-- ARGV[3] tier           the message's tier, used only when the stored job has none
-- ARGV[4] max_attempts   starts allowed before the job is given up
-- Returns 'run' to render a job that was queued; 'rerun' to render a job another delivery claimed
-- before (its worker died, or still renders it: the caller looks again before storing); 'done',
-- 'failed' or 'cancelled' to skip; 'unknown' for a job not on record; 'exhausted' when it was started
-- max_attempts times already.
--
-- Eight commands on the usual path: the stored job is read once, for its existence and its tier, and
-- the three counts move in one HMGET and one HSET.
local counts, states, running, meta, attempts, jobs = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local index, claim, tier, max_attempts = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

local st = redis.call('HGET', states, index)
if st == 'done' or st == 'failed' or st == 'cancelled' then return st end
local stored = redis.call('HGET', jobs, index)
if not stored then return 'unknown' end
if not st and redis.call('HGET', meta, 'cancelled') == '1' then return 'cancelled' end
if redis.call('HINCRBY', attempts, index, 1) > max_attempts then return 'exhausted' end
redis.call('HSET', running, index, claim)
if st == 'running' then return 'rerun' end
redis.call('HSET', states, index, 'running')
-- The tier it is counted under is the one stored with the batch, never the one a message claims.
local ok, job = pcall(cjson.decode, stored)
if ok and type(job) == 'table' and type(job.tier) == 'string' then tier = job.tier end
local c = redis.call('HMGET', counts, 'queued', 'queued:' .. tier, 'running')
redis.call('HSET', counts, 'queued', tonumber(c[1] or 0) - 1, 'queued:' .. tier, tonumber(c[2] or 0) - 1,
           'running', tonumber(c[3] or 0) + 1)
return 'run'
