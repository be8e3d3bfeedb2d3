-- createSession: admits a new playback session and grants it a seat, atomically.
--
-- KEYS[1]  <prefix>u:<user>           HASH the user's fencing generation counter ('g')
--                                       and seats (session id -> '1')
-- KEYS[2]  <prefix>s:<session>        STRING the new session's record
-- KEYS[3]  <prefix>deadlines          ZSET session id -> deadline, for the sweeper
-- KEYS[4]  <prefix>events             STREAM the partition's event log
-- KEYS[5]  <prefix>req:<user>/<id>  HASH the remembered answer to a request_id
--                                       (any key of the user when there is none)
-- KEYS[6]  <prefix>prog:<user>/<profile>  HASH the profile's watch progress, read only
-- KEYS[7..] <prefix>s:<session>       STRING the records of the sessions seated in KEYS[1]
--                                       and of the remembered session; when one is
--                                       missing the script writes nothing and replies
--                                       {-6, id, ...}
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   user id
-- ARGV[5]   new session id
-- ARGV[6]   seat limit
-- ARGV[7]   over-limit policy: 'reject_new' | 'stop_oldest'
-- ARGV[8]   heartbeat timeout, ms
-- ARGV[9]   request id; '' for none
-- ARGV[10]  how long a request id is remembered, ms
-- ARGV[11]  request fingerprint (profile|content|device)
-- ARGV[12]  profile id
-- ARGV[13]  content id
-- ARGV[14]  device id
-- ARGV[15]  device type, its stored code (DeviceType::code in model.rs)
-- ARGV[16]  device name
-- ARGV[17]  client IP address
-- ARGV[18]  client user agent
-- ARGV[19]  client region
-- ARGV[20]  at most this many overdue holders are expired here
-- ARGV[21]  the create rate limit's emission interval, ms; 0 for no limit
-- ARGV[22]  the rate limit's tolerance, ms: interval x (burst - 1)
--
-- Returns
--   {0, record, progress, replaced session id, ...}  created; progress is the profile's
--                                          entry for the title (progress_entry in the
--                                          prelude), or {} when it has none
--   {1, record, progress, replaced session id, ...}  the remembered answer to this
--                                          request_id
--   {-3, limit, holder record, ...}        limit reached (REJECT_NEW): nothing but
--                                          overdue holders' expiry and the rate cell
--                                          were written
--   {-5}                                   request_id reused for a different request
--   {-6, session id, ...}                  run again with these records in KEYS
--   {-8, retry after, ms}                  over the create rate: nothing was written

local user, sid, limit, policy = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local timeout_ms, request_id = tonumber(ARGV[8]), ARGV[9]
local fingerprint, device = ARGV[11], ARGV[14]
local now = now_ms()

-- Where playback resumes: read here, so a create is one call.
local function title_progress()
  local value = redis.call('HGET', KEYS[6], ARGV[13])
  return value and progress_entry(ARGV[13], value) or {}
end

local remembered = {}
if request_id ~= '' then
  remembered = redis.call('HMGET', KEYS[5], 'sid', 'fp', 'rep')
  if remembered[1] and remembered[2] ~= fingerprint then
    return {-5}
  end
end
local seats = seats_of(user)
local missing = records_needed(seats, remembered[1])
if missing then
  return missing
end

if remembered[1] then
  local s = load(remembered[1])
  if s then
    local reply = {1, flat(s), title_progress()}
    for replaced in string.gmatch(remembered[3], '[^,]+') do
      reply[#reply + 1] = replaced
    end
    return reply
  end
end

-- The rate limit (GCRA): the theoretical arrival time in the user hash's 'r' may run at
-- most the tolerance ahead of now; each admitted attempt moves it one interval on.
local interval = tonumber(ARGV[21])
if interval > 0 then
  local tolerance = tonumber(ARGV[22])
  local tat = math.max(tonumber(redis.call('HGET', KEYS[1], RATE) or '0'), now)
  if tat - now > tolerance then
    return {-8, int(tat - now - tolerance)}
  end
  redis.call('HSET', KEYS[1], RATE, int(tat + interval))
  -- A hash with no seat lives at least as long as its cell matters (one made here has
  -- no TTL yet); a hash that holds a seat has no TTL, and keeps none.
  local horizon = tat + interval - now + 1000
  if next(seats) == nil and redis.call('PTTL', KEYS[1]) < horizon then
    redis.call('PEXPIRE', KEYS[1], int(horizon))
  end
end

expire_overdue(user, seats, now, tonumber(ARGV[20]))

local holders = live_holders(seats, now)
local own, others = nil, {}
for _, s in ipairs(holders) do
  if s.d == device then
    own = s
  else
    others[#others + 1] = s
  end
end

local replaced = {}
if #others >= limit then
  if policy ~= 'stop_oldest' or limit == 0 then
    local reply = {-3, limit}
    for _, s in ipairs(holders) do
      reply[#reply + 1] = flat(s)
    end
    return reply
  end
  for i = 1, #others - limit + 1 do
    end_session(others[i], EVICTED, 'stop_oldest', now)
    replaced[#replaced + 1] = others[i].id
  end
end
if own then
  end_session(own, EVICTED, 'replaced_by_same_device', now)
  replaced[#replaced + 1] = own.id
end

local generation = redis.call('HINCRBY', KEYS[1], GENERATION, 1)
-- The record (see record in the prelude): fields that do not apply yet (the end) are
-- empty, and the id is the key's.
local s = {
  u = user, p = ARGV[12], c = ARGV[13], d = device, dt = ARGV[15],
  dn = ARGV[16], ip = ARGV[17], ua = ARGV[18], rg = ARGV[19],
  g = tostring(generation), ct = int(now),
  st = tostring(ACTIVE), pos = '0', ps = '0', hb = int(now),
}
next_deadline(s, now, timeout_ms, 0)
local stored = record(s)
redis.call('SET', KEYS[2], stored)
redis.call('HSET', KEYS[1], sid, SEATED)
-- The hash holds a seat now: its idle TTL, if it had one, ends.
redis.call('PERSIST', KEYS[1])
s.id = sid
hold_until_deadline(s)
append_event('playback.started', s, now)

if request_id ~= '' then
  redis.call('HSET', KEYS[5], 'sid', sid, 'fp', fingerprint, 'rep', table.concat(replaced, ','))
  redis.call('PEXPIRE', KEYS[5], ARGV[10])
end

local reply = {0, flat(s, stored), title_progress()}
for _, id in ipairs(replaced) do
  reply[#reply + 1] = id
end
return reply
