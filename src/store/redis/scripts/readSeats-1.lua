-- readSeats: the user's live holders and the store's clock, as one consistent read.
-- Writes nothing: holders past their deadline are left out, not expired.
--
-- KEYS[1]  <prefix>seats:<user>     ZSET session id -> heartbeat deadline (ms)
--
-- Beyond KEYS it reads, under the same hash tag (built from ARGV[1]), the records of the
-- holders it finds in KEYS[1] (<prefix>s:<id>).
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   user id
--
-- Returns {0, now in ms, holder record, ...}, oldest started first.

local now = now_ms()
local reply = {0, now}
for _, s in ipairs(live_holders(ARGV[4], now)) do
  reply[#reply + 1] = flat(s)
end
return reply
