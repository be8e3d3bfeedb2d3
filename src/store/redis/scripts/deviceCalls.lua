-- deviceCalls: heartbeats, pauses, resumes and stops of sessions, each done as if it
-- were alone, in order, in one script call (a batch of heartbeats that arrived together
-- costs Redis one call). On a Cluster the sessions are of one partition; on a Redis that
-- is not a Cluster, of any partitions, each call naming its own (its last ARGV).
--
-- KEYS: for each partition of the calls, in the order they first appear:
--          <prefix>deadlines          ZSET session id -> deadline (ms), for the sweeper
--          <prefix>events             STREAM the partition's event log
-- then two per call, in the order of the calls:
--          <prefix>s:<session>        STRING the session's record
--          <prefix>u:<user>           HASH the user's generation counter and seats
--
-- ARGV[1..3] see the prelude (ARGV[1] is the first call's prefix); ARGV[4..] see
-- device_call in the prelude.
--
-- Returns {0, answer, answer, ...}, one answer per call, each {0, record} (a brief
-- heartbeat's {0, st, dl, pos, ps, hb, pt}), {-1}, {-2, record} or {-4} (see the
-- prelude).

local now = now_ms()
local reply = {0}
for a = FIRST_CALL, #ARGV, CALL_ARGS do
  reply[#reply + 1] = device_call(a, now)
end
return reply
