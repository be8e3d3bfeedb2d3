-- getSession: reads a session, and ends it first if a device call would find it over:
-- past its heartbeat deadline (expired, with its event) or without its seat (evicted,
-- seat_lost). So GetSession, ListSessions, GetConcurrency and the token checks all give
-- one answer about a session whose deadline has passed.
--
-- KEYS[1]  <prefix>s:<session>        STRING the session's record
-- KEYS[2]  <prefix>u:<user>           HASH the user's generation counter and seats
-- KEYS[3]  <prefix>deadlines          ZSET session id -> deadline (ms), for the sweeper
-- KEYS[4]  <prefix>events             STREAM the partition's event log
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   user id
-- ARGV[5]   session id
--
-- Returns {0, record}, or {-1} when there is no such session of this user.

local now = now_ms()
local s, refused = live_session(ARGV[4], ARGV[5], now)
if s then
  return {0, flat(s)}
end
if refused[1] == -1 then
  return refused
end
return {0, refused[2]}
