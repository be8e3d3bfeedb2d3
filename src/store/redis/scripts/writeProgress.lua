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
local value = put_progress(KEYS[1], KEYS[2], content, ARGV[5], ARGV[6], ARGV[7], ARGV[8], now,
  ARGV[9], ARGV[10])
return {0, progress_entry(content, value)}
