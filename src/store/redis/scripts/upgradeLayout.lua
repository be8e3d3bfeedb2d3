-- upgradeLayout: moves one partition's keys from key layout 4 to 5, a slice of its sweep
-- index at a time. Layout 5 differs in TTLs alone: a live session's record and a user
-- hash that holds a seat have none (layout 4 gave both one and moved it hourly), so the
-- record of every session in the sweep index, and its user's hash, lose their TTLs.
-- Ended records keep theirs (the retention); so do the hashes of users with no seat.
-- Run again over a partition, it changes nothing more.
--
-- KEYS[1]  <prefix>deadlines          ZSET session id -> deadline (ms)
--
-- Like the sweep, this script touches the records and user hashes it finds through
-- KEYS[1], under the partition's hash tag (built from ARGV[1]), so it cannot name them
-- in advance (allow_undeclared).
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   the rank in KEYS[1] to start at
-- ARGV[5]   at most this many sessions are looked at
--
-- Returns {0, the rank to go on from, or -1 when the partition is done}.

allow_undeclared()
local from, count = tonumber(ARGV[4]), tonumber(ARGV[5])
local sids = redis.call('ZRANGE', KEYS[1], from, from + count - 1)
for _, sid in ipairs(sids) do
  local s = read(sid)
  if s and holds_seat(s) then
    redis.call('PERSIST', session_key(sid))
    redis.call('PERSIST', user_key(s.u))
  end
end
if #sids < count then
  return {0, -1}
end
return {0, from + count}
