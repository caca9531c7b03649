-- Record a delivered message as unacknowledged, as kombu's Redis QoS does with a MULTI/EXEC of two
-- commands: one script is one command from the worker, not four.
-- KEYS[1] index    kombu's unacked index (zset: delivery tag -> when delivered)
-- KEYS[2] unacked  kombu's unacked hash (delivery tag -> [message, exchange, routing key] JSON)
-- ARGV[1] tag      the message's delivery tag
-- ARGV[2] now      seconds since the epoch
-- ARGV[3] entry    the [message, exchange, routing key] JSON kombu restores from
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
