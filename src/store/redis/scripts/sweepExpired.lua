-- sweepExpired: expires the partition's sessions whose heartbeat deadline has passed,
-- so their seats and expired events do not wait for the user's next create.
--
-- KEYS[1]  <prefix>deadlines          ZSET session id -> deadline (ms)
-- KEYS[2]  <prefix>events             STREAM the partition's event log
--
-- This script cannot know its keys in advance: it ends sessions it finds in KEYS[1], so it
-- touches their records (<prefix>s:<id>) and their users' hashes (<prefix>u:<user>), all
-- under the partition's hash tag (built from ARGV[1]). It is the one script that calls
-- allow_undeclared(); on a Redis that refuses undeclared keys, expiry still happens on
-- each user's next create, read or device call, just not ahead of it.
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   at most this many sessions are looked at (bounds the script's work)
--
-- Returns {0, number of sessions expired, ms until the earliest deadline left (0 when
-- overdue ones remain), or -1 when the partition holds none}.

allow_undeclared()
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0, tonumber(ARGV[4]))
local expired = 0
for _, sid in ipairs(due) do
  local s = load(sid)
  if s and holds_seat(s) and tonumber(s.dl) <= now then
    end_session(s, EXPIRED, deadline_reason(s), now)
    expired = expired + 1
  else
    redis.call('ZREM', KEYS[1], sid)
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_due = -1
if first[2] then
  next_due = math.max(0, tonumber(first[2]) - now)
end
return {0, expired, next_due}
