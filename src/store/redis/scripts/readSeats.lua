-- readSeats: the user's live holders and the store's clock, as one consistent read.
-- Writes nothing: holders past their deadline are left out, not expired.
--
-- KEYS[1]  <prefix>u:<user>         HASH the user's generation counter and seats
-- KEYS[2..] <prefix>s:<session>     STRING the records of the sessions seated in KEYS[1];
--                                     when one is missing the script replies {-6, id, ...}
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   user id
--
-- Returns {0, now in ms, holder record, ...}, oldest started first, or {-6, id, ...}.

local now = now_ms()
local seats = seats_of(ARGV[4])
local missing = records_needed(seats)
if missing then
  return missing
end
local reply = {0, now}
for _, s in ipairs(live_holders(seats, now)) do
  reply[#reply + 1] = flat(s)
end
return reply
