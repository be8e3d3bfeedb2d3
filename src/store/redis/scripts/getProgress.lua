-- getProgress: a title's progress for a profile.
--
-- KEYS[1]  <prefix>prog:<user>/<profile>    HASH content -> "pos,dur,done,updated_ms,device"
-- KEYS[2]  <prefix>recent:<user>/<profile>  ZSET given to every progress function; not read
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   content id
--
-- Returns {0, entry} (see progress_entry in the prelude), or {-1}.

local value = redis.call('HGET', KEYS[1], ARGV[4])
if not value then
  return {-1}
end
return {0, progress_entry(ARGV[4], value)}
