-- Forget an acknowledged message, as kombu's Redis QoS does with a MULTI/EXEC of two commands.
-- KEYS[1] index    kombu's unacked index (zset: delivery tag -> when delivered)
-- KEYS[2] unacked  kombu's unacked hash
-- ARGV[1] tag      the message's delivery tag
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
