-- usher's Lua prelude, prepended to every script (see store/redis/mod.rs).
--
-- Every script takes the same first three ARGV:
--   ARGV[1]  key prefix with the user's partition hash tag, e.g. "usher:{17}:"
--   ARGV[2]  approximate cap of the partition's event stream, in entries
--   ARGV[3]  how long an ended session's record is kept, in ms
--
-- Every key a script touches is in its KEYS, built in Rust (store/redis/mod.rs, Keys).
-- The prelude's key helpers build a key's name from ARGV[1] and then check that it is in
-- KEYS, so a script that reaches for an undeclared key fails loudly instead of working
-- only on an open-source Cluster (proxies and managed variants refuse undeclared keys).
-- A script that needs records it could not be given (other sessions of the user, found
-- in the seat set) replies {-6, id, ...}: the caller runs it again with those records in
-- KEYS. The sweep alone cannot know its keys in advance and says so (allow_undeclared).
--
-- Replies are arrays {code, ...}, decoded by ReplyCode in store/redis/reply.rs:
--    0  done, the answer follows
--    1  the remembered answer to a repeated request_id follows
--   -1  not found
--   -2  session ended: {-2, record}
--   -3  limit reached: {-3, limit, record, record, ...}
--   -4  stale generation
--   -5  request_id reused for a different request
--   -6  records needed: {-6, session id, ...}; nothing was written
-- A record is a flat HGETALL array of the session hash (fields in store/redis/mod.rs).
--
-- Time is redis.call('TIME') only, never the caller's clock.

local PREFIX = ARGV[1]
local STREAM_MAXLEN = ARGV[2]
local RETENTION_MS = tonumber(ARGV[3])

-- The stored codes of SessionState and PlaybackState (model.rs, `code()`): the storage
-- format, not the wire's numbers; a unit test in store/redis/mod.rs holds them equal.
local ACTIVE, PAUSED, STOPPED, TERMINATED, EXPIRED, EVICTED = 1, 2, 3, 4, 5, 6
local END_EVENT = {
  [STOPPED] = 'playback.stopped',
  [TERMINATED] = 'playback.terminated',
  [EXPIRED] = 'playback.expired',
  [EVICTED] = 'playback.evicted',
}
local PLAYBACK_PLAYING, PLAYBACK_PAUSED = 1, 4

-- A shard channel, not a key: publishing to it needs no KEYS entry.
local STOP_CHANNEL = PREFIX .. 'stop'

local DECLARED = {}
for _, key in ipairs(KEYS) do
  DECLARED[key] = true
end
local undeclared_allowed = false

-- The sweep's escape from the KEYS rule; see its header.
local function allow_undeclared()
  undeclared_allowed = true
end

-- key, after checking that the script was given it.
local function declared(key)
  if not undeclared_allowed and not DECLARED[key] then
    error('usher: key not in KEYS: ' .. key)
  end
  return key
end

-- Integers as text without exponent, for scores, ranges and hash values.
local function int(n)
  return string.format('%d', n)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function session_key(sid)
  return declared(PREFIX .. 's:' .. sid)
end

local function user_key(user, what)
  return declared(PREFIX .. what .. ':' .. user)
end

local function deadlines_key()
  return declared(PREFIX .. 'deadlines')
end

local function events_key()
  return declared(PREFIX .. 'events')
end

-- nil when the records of all ids are in KEYS; otherwise the {-6, id, ...} reply that
-- asks for the missing ones.
local function records_needed(ids)
  local reply = {-6}
  for _, sid in ipairs(ids) do
    if not DECLARED[PREFIX .. 's:' .. sid] then
      reply[#reply + 1] = sid
    end
  end
  if #reply > 1 then
    return reply
  end
  return nil
end

local function sweep_member(s)
  return s.u .. '/' .. s.id
end

-- The session record as a table, or nil.
local function load(sid)
  local flat = redis.call('HGETALL', session_key(sid))
  if #flat == 0 then
    return nil
  end
  local s = {}
  for i = 1, #flat, 2 do
    s[flat[i]] = flat[i + 1]
  end
  return s
end

local function flat(s)
  local out = {}
  for k, v in pairs(s) do
    out[#out + 1] = k
    out[#out + 1] = tostring(v)
  end
  return out
end

local function holds_seat(s)
  local st = tonumber(s.st)
  return st == ACTIVE or st == PAUSED
end

-- Appends an event of s; an ended session's carries its end reason, and a terminated
-- one's the operator's message and name.
local function append_event(kind, s, now)
  local fields = {
    'type', kind, 'user', s.u, 'session', s.id, 'gen', s.g, 'device', s.d,
    'content', s.c, 'profile', s.p, 'pos_ms', s.pos, 'at_ms', int(now), 'reason', s.er or '',
  }
  if s.em and s.em ~= '' then
    for _, v in ipairs({'message', s.em, 'by', s.eb}) do
      fields[#fields + 1] = v
    end
  end
  redis.call('XADD', events_key(), 'MAXLEN', '~', STREAM_MAXLEN, '*', unpack(fields))
end

-- Ends a seat-holding session: releases its seat and device, keeps the record for the
-- retention period, appends its event and tells its device's stream to stop. reason is
-- an end reason's stored name (EndReason::as_str in session/mod.rs).
local function end_session(s, state, reason, now)
  local key = session_key(s.id)
  s.st, s.et, s.er = tostring(state), int(now), reason
  redis.call('HSET', key, 'st', s.st, 'et', s.et, 'er', reason)
  redis.call('PEXPIRE', key, RETENTION_MS)
  redis.call('ZREM', user_key(s.u, 'seats'), s.id)
  local devices = user_key(s.u, 'devices')
  if redis.call('HGET', devices, s.d) == s.id then
    redis.call('HDEL', devices, s.d)
  end
  redis.call('ZREM', deadlines_key(), sweep_member(s))
  append_event(END_EVENT[state], s, now)
  redis.call('SPUBLISH', STOP_CHANNEL, sweep_member(s))
end

-- Sets a live session's deadline (s.dl) to timeout from now, capped by the maximum pause
-- while paused, and what missing it would be called (s.dr). The caller writes both with
-- the rest of the record, in one HSET, and then calls hold_until_deadline.
local function next_deadline(s, now, timeout_ms, max_pause_ms)
  local deadline, reason = now + timeout_ms, 'heartbeat_timeout'
  if tonumber(s.st) == PAUSED and s.pt and s.pt ~= '' then
    local pause_end = tonumber(s.pt) + max_pause_ms
    if pause_end < deadline then
      deadline, reason = pause_end, 'max_pause_exceeded'
    end
  end
  s.dl, s.dr = int(deadline), reason
end

-- Holds the seat until s.dl (already written): the record outlives it by the retention,
-- the seat set and the sweep order score it, and the user's generation counter (gen_key,
-- which the calling script has in KEYS) is kept for generation_ttl_ms more
-- (GENERATION_IDLE_TTL in store/mod.rs, passed in ARGV).
local function hold_until_deadline(s, now, generation_ttl_ms, gen_key)
  redis.call('PEXPIRE', session_key(s.id), tonumber(s.dl) - now + RETENTION_MS)
  redis.call('ZADD', user_key(s.u, 'seats'), s.dl, s.id)
  redis.call('ZADD', deadlines_key(), s.dl, sweep_member(s))
  redis.call('PEXPIRE', gen_key, generation_ttl_ms)
end

-- Expires up to max holders of user whose deadline has passed.
local function expire_overdue(user, now, max)
  local seats = user_key(user, 'seats')
  local overdue = redis.call('ZRANGEBYSCORE', seats, '-inf', int(now), 'LIMIT', 0, max)
  for _, sid in ipairs(overdue) do
    local s = load(sid)
    if s and holds_seat(s) then
      end_session(s, EXPIRED, s.dr, now)
    else
      redis.call('ZREM', seats, sid)
    end
  end
end

-- Live holders of user (seat held, deadline after now), oldest started first.
local function live_holders(user, now)
  local ids = redis.call('ZRANGEBYSCORE', user_key(user, 'seats'), '(' .. int(now), '+inf')
  local holders = {}
  for _, sid in ipairs(ids) do
    local s = load(sid)
    if s and holds_seat(s) then
      holders[#holders + 1] = s
    end
  end
  table.sort(holders, function(a, b)
    local ca, cb = tonumber(a.ct), tonumber(b.ct)
    if ca ~= cb then
      return ca < cb
    end
    return a.id < b.id
  end)
  return holders
end

-- The session, if it is live; otherwise nil and the reply to return. A session past
-- its deadline is expired now; one whose seat is gone (lost in a failover) is evicted.
local function live_session(user, sid, now)
  local s = load(sid)
  if not s or s.u ~= user then
    return nil, {-1}
  end
  if not holds_seat(s) then
    return nil, {-2, flat(s)}
  end
  if tonumber(s.dl) <= now then
    end_session(s, EXPIRED, s.dr, now)
    return nil, {-2, flat(s)}
  end
  if not redis.call('ZSCORE', user_key(user, 'seats'), sid) then
    end_session(s, EVICTED, 'seat_lost', now)
    return nil, {-2, flat(s)}
  end
  return s
end

-- The body of every device call (heartbeat, pause, resume, stop). Device-call ARGV:
--   ARGV[4]   user id
--   ARGV[5]   session id
--   ARGV[6]   generation the device holds; '0' skips the check
--   ARGV[7]   position in ms; '' keeps the last one
--   ARGV[8]   playback state, its stored code (PlaybackState::code); '0' keeps the last one
--   ARGV[9]   heartbeat timeout, ms
--   ARGV[10]  maximum pause, ms
--   ARGV[11]  heartbeat events: 'off' | 'sampled' | 'all'
--   ARGV[12]  sampled heartbeat event interval, ms
--   ARGV[13]  how long the user's generation counter is kept after this call, ms
--   ARGV[14]  'brief': a done heartbeat replies {0, st, dl, pos, ps, hb, pt} (what it
--             changed) instead of the whole record
local function device_call(action)
  local user, sid, generation = ARGV[4], ARGV[5], ARGV[6]
  local now = now_ms()
  local s, refused = live_session(user, sid, now)
  if not s then
    return refused
  end
  if generation ~= '0' and generation ~= s.g then
    return {-4}
  end
  local key = session_key(sid)
  s.hb = int(now)
  if ARGV[7] ~= '' then
    s.pos = ARGV[7]
  end
  if action == 'stop' then
    redis.call('HSET', key, 'hb', s.hb, 'pos', s.pos)
    end_session(s, STOPPED, 'stopped_by_device', now)
    return {0, flat(s)}
  end
  local event
  local state = tonumber(s.st)
  if action == 'heartbeat' then
    if ARGV[8] ~= '0' then
      s.ps = ARGV[8]
    end
    -- A reported PAUSED pauses and PLAYING resumes, as the explicit calls do.
    local reported = tonumber(ARGV[8])
    local mode = ARGV[11]
    if reported == PLAYBACK_PAUSED and state == ACTIVE then
      s.st, s.pt = tostring(PAUSED), int(now)
      event = 'playback.paused'
    elseif reported == PLAYBACK_PLAYING and state == PAUSED then
      s.st, s.pt = tostring(ACTIVE), ''
      event = 'playback.resumed'
    elseif mode == 'all' or (mode == 'sampled' and now - tonumber(s.he) >= tonumber(ARGV[12])) then
      s.he = int(now)
      event = 'playback.heartbeat'
    end
  elseif action == 'pause' and state == ACTIVE then
    s.st, s.pt, s.ps = tostring(PAUSED), int(now), tostring(PLAYBACK_PAUSED)
    event = 'playback.paused'
  elseif action == 'resume' and state == PAUSED then
    s.st, s.pt, s.ps = tostring(ACTIVE), '', tostring(PLAYBACK_PLAYING)
    event = 'playback.resumed'
  end
  next_deadline(s, now, tonumber(ARGV[9]), tonumber(ARGV[10]))
  redis.call('HSET', key, 'hb', s.hb, 'pos', s.pos, 'ps', s.ps, 'st', s.st, 'pt', s.pt,
    'he', s.he, 'dl', s.dl, 'dr', s.dr)
  -- KEYS[6], the generation key, is given to the scripts that reach this (not stop's).
  hold_until_deadline(s, now, tonumber(ARGV[13]), KEYS[6])
  if event then
    append_event(event, s, now)
  end
  if action == 'heartbeat' and ARGV[14] == 'brief' then
    return {0, s.st, s.dl, s.pos, s.ps, s.hb, s.pt}
  end
  return {0, flat(s)}
end
