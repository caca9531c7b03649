-- Every live worker's largest image, in one step: what a batch status needs to count the jobs that wait
-- for a worker able to render them (shared.registry.queue_live_max_pixels).
-- KEYS[1]  the set of registered worker names
-- ARGV[1]  the prefix of a worker's registration key (the key is the prefix and the name)
-- Returns a flat list: name, max_pixels, name, max_pixels... for each worker whose entry has not expired.
local workers, prefix = KEYS[1], ARGV[1]

local out = {}
for _, name in ipairs(redis.call('SMEMBERS', workers)) do
  local px = redis.call('HGET', prefix .. name, 'max_pixels')
  if px then
    table.insert(out, name)
    table.insert(out, px)
  end
end
return out
