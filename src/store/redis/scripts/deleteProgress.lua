-- deleteProgress: forgets a title's progress for a profile.
--
-- KEYS[1]  <prefix>prog:<user>/<profile>    HASH content -> "pos,dur,done,updated_ms,device"
-- KEYS[2]  <prefix>recent:<user>/<profile>  ZSET content -> updated_ms
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   content id
--
-- Returns {0, 1} when there was progress to forget, {0, 0} otherwise.

local removed = redis.call('HDEL', KEYS[1], ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[4])
return {0, removed}
