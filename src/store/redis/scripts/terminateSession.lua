-- terminateSession: an operator or another service ends a live session.
--
-- KEYS[1]  <prefix>s:<session>        STRING the session's record
-- KEYS[2]  <prefix>u:<user>           HASH the user's generation counter and seats
-- KEYS[3]  <prefix>deadlines          ZSET session id -> deadline (ms), for the sweeper
-- KEYS[4]  <prefix>events             STREAM the partition's event log
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   user id
-- ARGV[5]   session id
-- ARGV[6]   the operator's reason, verbatim (kept as `em`)
-- ARGV[7]   the acting caller's name (kept as `eb`)
--
-- Returns {0, record}, or {-1}, {-2, record} (see the prelude).

local now = now_ms()
local s, refused = live_session(ARGV[4], ARGV[5], now)
if not s then
  return refused
end
s.em, s.eb = ARGV[6], ARGV[7]
end_session(s, TERMINATED, 'terminated_by_operator', now)
return {0, flat(s)}
