-- heartbeat: proves the device is alive, records position and playback state.
--
-- KEYS[1]  <prefix>s:<session>        HASH the session's record
-- KEYS[2]  <prefix>seats:<user>     ZSET session id -> heartbeat deadline (ms)
-- KEYS[3]  <prefix>devices:<user>   HASH device id -> session id
-- KEYS[4]  <prefix>deadlines          ZSET <user>/<session> -> deadline
-- KEYS[5]  <prefix>events             STREAM the partition's event log
-- KEYS[6]  <prefix>gen:<user>         STRING the user's generation counter (its TTL moves)
--
-- ARGV[1..3] see the prelude; ARGV[4..14] see device_call in the prelude.
--
-- Returns {0, record} (with ARGV[14] 'brief': {0, st, dl, pos, ps, hb, pt}), or {-1},
-- {-2, record}, {-4} (see the prelude).

return device_call('heartbeat')
