-- How many more jobs the ledger counts unfinished than job messages exist, read atomically: the
-- dead-message sweep's cheap first look (worker.sweeper.message_deficit). Queued jobs count only in the
-- size tiers given, so jobs waiting in queues no worker here consumes make no deficit.
-- KEYS[1]       the kombu unacked hash
-- KEYS[2..]     each active batch's counts hash (running, queued:<tier>)
-- ARGV[1]       the number of tiers N
-- ARGV[2..N+1]  the tiers
-- ARGV[N+2..]   the job queues
-- Returns jobs minus messages.
local unacked = KEYS[1]
local tiers = tonumber(ARGV[1])

local jobs = 0
for i = 2, #KEYS do
  jobs = jobs + tonumber(redis.call('HGET', KEYS[i], 'running') or 0)
  for t = 2, tiers + 1 do
    jobs = jobs + tonumber(redis.call('HGET', KEYS[i], 'queued:' .. ARGV[t]) or 0)
  end
end
local messages = redis.call('HLEN', unacked)
for q = tiers + 2, #ARGV do messages = messages + redis.call('LLEN', ARGV[q]) end
return jobs - messages
