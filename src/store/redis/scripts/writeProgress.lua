-- writeProgress: records how far a profile got in a title, stamped with Redis' clock
-- (the latest write wins), and keeps the profile's entries capped and expiring.
--
-- KEYS[1]  <prefix>prog:<user>/<profile>    HASH content -> "pos,dur,done,updated_ms,device"
-- KEYS[2]  <prefix>recent:<user>/<profile>  ZSET content -> updated_ms
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   content id
-- ARGV[5]   position, ms
-- ARGV[6]   duration, ms; '' when unknown
-- ARGV[7]   '1' when completed, '0' otherwise
-- ARGV[8]   device id
-- ARGV[9]   at most this many titles per profile: the least recently written go
-- ARGV[10]  how long the profile's progress is kept after this write, ms
--
-- Returns {0, entry} (see progress_entry in the prelude).

local now = now_ms()
local content = ARGV[4]
local value = table.concat({ARGV[5], ARGV[6], ARGV[7], int(now), ARGV[8]}, ',')
redis.call('HSET', KEYS[1], content, value)
redis.call('ZADD', KEYS[2], now, content)
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[9])
if over > 0 then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, over - 1)
  redis.call('ZREM', KEYS[2], unpack(oldest))
  redis.call('HDEL', KEYS[1], unpack(oldest))
end
redis.call('PEXPIRE', KEYS[1], ARGV[10])
redis.call('PEXPIRE', KEYS[2], ARGV[10])
return {0, progress_entry(content, value)}
