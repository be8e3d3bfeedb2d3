-- terminateSession: an operator or another service ends a live session.
--
-- KEYS[1]  <prefix>s:<session>        HASH the session's record
-- KEYS[2]  <prefix>u:<user>:seats     ZSET session id -> heartbeat deadline (ms)
-- KEYS[3]  <prefix>u:<user>:devices   HASH device id -> session id
-- KEYS[4]  <prefix>deadlines          ZSET <user>/<session> -> deadline
-- KEYS[5]  <prefix>events             STREAM the partition's event log
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   user id
-- ARGV[5]   session id
-- ARGV[6]   the operator's reason
--
-- Returns {0, record}, or {-1}, {-2, record} (see the prelude).

local now = now_ms()
local s, refused = live_session(ARGV[4], ARGV[5], now)
if not s then
  return refused
end
end_session(s, TERMINATED, ARGV[6], now)
return {0, flat(s)}
