-- usher's Lua prelude: the start of the Redis Functions library that holds every script
-- of this directory as a function (see Library in store/redis/mod.rs). The library is
-- loaded once per server and its functions are called with FCALL, so the helpers
-- below are made once, not on every call.
--
-- Every function takes the same first three ARGV:
--   ARGV[1]  key prefix with the user's partition hash tag, e.g. "usher:{17}:"
--   ARGV[2]  approximate cap of the partition's event stream, in entries
--   ARGV[3]  how long an ended session's record is kept, in ms
--
-- Every key a function touches is in its KEYS, built in Rust (store/redis/mod.rs, Keys).
-- The prelude's key helpers build a key's name from ARGV[1] and then check that it is in
-- KEYS, so a function that reaches for an undeclared key fails loudly instead of working
-- only on an open-source Cluster (proxies and managed variants refuse undeclared keys).
-- A function that needs records it could not be given (other sessions of the user,
-- found in the user's seats) replies {-6, id, ...}: the caller runs it again with those
-- records in KEYS. The sweep alone cannot know its keys in advance and says so
-- (allow_undeclared).
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
--   -7  profile needed (a device call's answer): {-7, profile id}; the call wrote
--       nothing, and is to be sent again with that profile's progress keys
-- A record in a reply is one string: the session id, SEP, and the record as stored (see
-- record), which does not repeat the id its key already names. usher splits it (reply.rs),
-- so a script never splits a record only to answer with it.
--
-- Time is redis.call('TIME') only, never the caller's clock.

-- The call's keys and arguments and what follows from them, set by begin() as each
-- function starts: Redis runs one function at a time, so they are the running call's.
local KEYS, ARGV
local PREFIX, STREAM_MAXLEN, RETENTION_MS
-- A shard channel, not a key: publishing to it needs no KEYS entry.
local STOP_CHANNEL
local DECLARED, undeclared_allowed

local function begin(keys, args)
  KEYS, ARGV = keys, args
  PREFIX, STREAM_MAXLEN, RETENTION_MS = args[1], args[2], tonumber(args[3])
  STOP_CHANNEL = PREFIX .. 'stop'
  DECLARED = {}
  for _, key in ipairs(keys) do
    DECLARED[key] = true
  end
  undeclared_allowed = false
end

-- How long a user hash that holds no seat is kept (its generation counter and rate cell),
-- after its last seat is released: GENERATION_IDLE_TTL in store/mod.rs, which a unit test
-- holds equal. A hash that holds a seat, and a live session's record, have no TTL: the
-- sweep index ends every live session, with its event, however late the sweep runs, and
-- a TTL would cost each key an entry in Redis' expires table (about 32 bytes) and a
-- heartbeat its refresh.
local GENERATION_IDLE_TTL_MS = 2592000000

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

-- The user hash's field that holds the generation counter; every other field is a seat.
local GENERATION = 'g'
-- The user hash's create rate cell (createSession): not a seat.
local RATE = 'r'
-- A seat's value: a seat is its field's name, the session id.
local SEATED = '1'

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

local function user_key(user)
  return declared(PREFIX .. 'u:' .. user)
end

local function deadlines_key()
  return declared(PREFIX .. 'deadlines')
end

local function events_key()
  return declared(PREFIX .. 'events')
end

-- The user's seats: session id -> true, from the user hash. A seat is only a name: its
-- deadline is the record's (and the sweep index's), so a heartbeat leaves the user hash
-- as it is.
local function seats_of(user)
  local seats = {}
  for _, field in ipairs(redis.call('HKEYS', user_key(user))) do
    if field ~= GENERATION and field ~= RATE then
      seats[field] = true
    end
  end
  return seats
end

-- Releases the user's seat sid. A user hash left with no seat starts its idle TTL.
local function release_seat(user, sid)
  redis.call('HDEL', user_key(user), sid)
  if next(seats_of(user)) == nil then
    redis.call('PEXPIRE', user_key(user), GENERATION_IDLE_TTL_MS)
  end
end

-- nil when the records of all seats' sessions (and of extra, when given) are in KEYS;
-- otherwise the {-6, id, ...} reply that asks for the missing ones.
local function records_needed(seats, extra)
  local reply = {-6}
  for sid in pairs(seats) do
    if not DECLARED[PREFIX .. 's:' .. sid] then
      reply[#reply + 1] = sid
    end
  end
  if extra and not DECLARED[PREFIX .. 's:' .. extra] then
    reply[#reply + 1] = extra
  end
  if #reply > 1 then
    return reply
  end
  return nil
end

-- The notice of an ended session on the stop channel, '<user>/<session>'.
local function notice(s)
  return s.u .. '/' .. s.id
end

-- What device calls change is packed in the record's first field, 'h':
-- "st,dl,hb,pos,ps,pt,he,dr,pw" (pt, he, dr and pw, the last progress write, empty when
-- they do not apply, and left out when no later one follows). Scripts see them as
-- fields of s.
local function packed(s)
  local out = {s.st, s.dl, s.hb, s.pos, s.ps, s.pt or '', s.he or '', s.dr or '', s.pw or ''}
  while out[#out] == '' do
    out[#out] = nil
  end
  return table.concat(out, ',')
end

-- The session record is one string value (since key layout 4): its fields in a fixed order,
-- joined by SEP, which no stored value holds (ids are [A-Za-z0-9._:-], free text
-- refuses control characters, numbers are digits). A string has no encoding cliff: a hash
-- with one value over 64 bytes (a browser's user agent) leaves Redis' compact listpack
-- and costs about twice the memory. The head is what every device call reads and
-- writes: 'h' (see packed), then u, g, ct and du; the tail, the rest, is split only
-- when a call needs it (complete). Fields that do not apply (du before a device gives
-- the duration, the end's et er em eb) are empty.
local SEP = '\31'
-- The head, 'h' split into its fields (see packed) and u, g, ct and du, and the tail
-- whole: one match, so no 'h' string is made only to be split again.
local HEAD = '^(%d+),(%d+),(%d+),(%d+),(%d+),?(%d*),?(%d*),?(%a*),?(%d*)'
  .. '\31([^\31]*)\31([^\31]*)\31([^\31]*)\31([^\31]*)\31(.*)$'
local TAIL = {'d', 'c', 'p', 'dt', 'dn', 'ip', 'ua', 'rg', 'et', 'er', 'em', 'eb'}
local OPTIONAL = {du = true, et = true, er = true, em = true, eb = true}

-- s with the fields of its record's tail (s.tail, kept whole until then); returns s.
local function complete(s)
  local tail = s.tail
  if tail then
    s.tail = nil
    local from = 1
    for _, field in ipairs(TAIL) do
      local to = string.find(tail, SEP, from, true) or #tail + 1
      local value = string.sub(tail, from, to - 1)
      if value ~= '' or not OPTIONAL[field] then
        s[field] = value
      end
      from = to + 1
    end
  end
  return s
end

-- The session record with its head read and its tail kept whole (its id in s.id), or
-- nil.
local function read(sid)
  local value = redis.call('GET', session_key(sid))
  if not value then
    return nil
  end
  local st, dl, hb, pos, ps, pt, he, dr, pw, u, g, ct, du, tail = string.match(value, HEAD)
  if not st then
    error('usher: corrupt session record ' .. sid)
  end
  return {
    id = sid, st = st, dl = dl, hb = hb, pos = pos, ps = ps,
    pt = pt ~= '' and pt or nil, he = he ~= '' and he or nil, dr = dr ~= '' and dr or nil,
    pw = pw ~= '' and pw or nil, u = u, g = g, ct = ct, du = du ~= '' and du or nil,
    tail = tail,
  }
end

-- The whole session record as a table (its id in s.id), or nil.
local function load(sid)
  local s = read(sid)
  return s and complete(s)
end

-- s as its stored string; a tail not yet split is written back as it was read. Empty
-- fields at the end are left out (the device id, never empty, keeps the head whole).
local function record(s)
  local out = {packed(s), s.u, s.g, s.ct, s.du or ''}
  if s.tail then
    out[#out + 1] = s.tail
  else
    for _, field in ipairs(TAIL) do
      out[#out + 1] = s[field] or ''
    end
    while out[#out] == '' do
      out[#out] = nil
    end
  end
  return table.concat(out, SEP)
end

-- The record as a reply: its id and the record as stored (stored, when the caller has
-- it already, or record(s)).
local function flat(s, stored)
  return s.id .. SEP .. (stored or record(s))
end

local function holds_seat(s)
  local st = tonumber(s.st)
  return st == ACTIVE or st == PAUSED
end

-- What missing s's deadline is called: the stored name of its end reason.
local function deadline_reason(s)
  if s.dr == 'p' then
    return 'max_pause_exceeded'
  end
  return 'heartbeat_timeout'
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

-- Ends a seat-holding session: releases its seat, keeps the record for the retention
-- period, appends its event and tells its device's stream to stop. reason is an end
-- reason's stored name (EndReason::as_str in session/mod.rs).
local function end_session(s, state, reason, now)
  complete(s)
  s.st, s.et, s.er = tostring(state), int(now), reason
  redis.call('SET', session_key(s.id), record(s), 'PX', RETENTION_MS)
  release_seat(s.u, s.id)
  redis.call('ZREM', deadlines_key(), s.id)
  append_event(END_EVENT[state], s, now)
  redis.call('SPUBLISH', STOP_CHANNEL, notice(s))
end

-- Sets a live session's deadline (s.dl) to timeout from now, capped by the maximum pause
-- while paused, and marks a capped one (s.dr = 'p', nil otherwise). The caller writes
-- them (packed) and then calls hold_until_deadline.
local function next_deadline(s, now, timeout_ms, max_pause_ms)
  local deadline, capped = now + timeout_ms, nil
  if tonumber(s.st) == PAUSED and s.pt then
    local pause_end = tonumber(s.pt) + max_pause_ms
    if pause_end < deadline then
      deadline, capped = pause_end, 'p'
    end
  end
  s.dl, s.dr = int(deadline), capped
end

-- Holds the seat until s.dl (already written in the record): the sweep index carries
-- the deadline.
local function hold_until_deadline(s)
  redis.call('ZADD', deadlines_key(), s.dl, s.id)
end

-- Releases up to max of user's seats that hold no live session: a holder whose
-- deadline has passed is expired, and a seat whose record is gone or ended (left by a
-- failover's lost write) is dropped. seats is seats_of(user), every record in KEYS; it
-- loses the seats released, and the others it looked at carry their records.
local function expire_overdue(user, seats, now, max)
  local done = 0
  for sid in pairs(seats) do
    if done >= max then
      break
    end
    local s = load(sid)
    if s and holds_seat(s) and tonumber(s.dl) > now then
      seats[sid] = s
    else
      if s and holds_seat(s) then
        end_session(s, EXPIRED, deadline_reason(s), now)
      else
        release_seat(user, sid)
      end
      seats[sid] = nil
      done = done + 1
    end
  end
end

-- Live holders among seats (seat held, deadline after now), oldest started first.
local function live_holders(seats, now)
  local holders = {}
  for sid, known in pairs(seats) do
    local s = known
    if s == true then
      s = load(sid)
    end
    if s and holds_seat(s) and tonumber(s.dl) > now then
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
    end_session(s, EXPIRED, deadline_reason(s), now)
    return nil, {-2, flat(s)}
  end
  if not redis.call('HGET', user_key(user), sid) then
    end_session(s, EVICTED, 'seat_lost', now)
    return nil, {-2, flat(s)}
  end
  return s
end

-- A progress entry as replies carry it: {content, pos, dur, done, updated_ms, device},
-- from its stored value "pos,dur,done,updated_ms,device" (dur '' when unknown).
local function progress_entry(content, value)
  local pos, dur, done, updated, device = string.match(value, '^(%d+),(%d*),([01]),(%d+),(.+)$')
  return {content, pos, dur, done, updated, device}
end

-- Writes a title's progress into a profile's keys (hash: content -> stored value;
-- recent: content -> updated_ms), stamped now, keeping at most cap titles (the least
-- recently written go) for retention_ms. Returns the stored value.
local function put_progress(hash, recent, content, pos, dur, done, device, now, cap, retention_ms)
  local value = table.concat({pos, dur, done, int(now), device}, ',')
  local added = redis.call('HSET', hash, content, value)
  redis.call('ZADD', recent, now, content)
  if added == 1 then
    local over = redis.call('ZCARD', recent) - tonumber(cap)
    if over > 0 then
      local oldest = redis.call('ZRANGE', recent, 0, over - 1)
      redis.call('ZREM', recent, unpack(oldest))
      redis.call('HDEL', hash, unpack(oldest))
    end
  end
  redis.call('PEXPIRE', hash, retention_ms)
  redis.call('PEXPIRE', recent, retention_ms)
  return value
end

-- Device calls (deviceCalls.lua). ARGV after the common three:
--   ARGV[4]   heartbeat timeout, ms
--   ARGV[5]   maximum pause, ms
--   ARGV[6]   heartbeat events: 'off' | 'sampled' | 'all'
--   ARGV[7]   sampled heartbeat event interval, ms
--   ARGV[8]   'brief': a done heartbeat answers {0, st, dl, pos, ps, hb, pt} (what it
--             changed, pt '' when playing) instead of {0, record}
--   ARGV[9]   a session's heartbeats write progress at most once per this, ms
--   ARGV[10]  past this fraction of its duration a title is finished
--   ARGV[11]  within this of its end (the credits) too, ms
--   ARGV[12]  at most this many titles per profile (see put_progress)
--   ARGV[13]  how long a profile's progress is kept after a write, ms
--   then nine per call, from ARGV[14]: action ('heartbeat' | 'pause' | 'resume' |
--   'stop'), user id, session id, the generation the device holds ('0' skips the
--   check), position in ms ('' keeps the last one), playback state (its stored code,
--   PlaybackState::code; '0' keeps the last one), the title's duration in ms ('' when
--   the player did not say), the session's profile id when the caller knows it (''
--   otherwise: then that profile's progress keys are in KEYS after the call's two), and
--   the key prefix of the session's partition (as ARGV[1]; on a Redis that is not a
--   Cluster, calls of several partitions go in one script call).
local FIRST_CALL, CALL_ARGS = 14, 9

-- The session of a device call when it is plainly live (the case of nearly every call),
-- its tail kept whole; nil otherwise, and live_session decides. A heartbeat that
-- answers with the whole record writes the tail back and answers it as read, never
-- split (a unary heartbeat spent about a fifth of its time in Redis splitting it).
local function beating_session(user, sid, now)
  local s = read(sid)
  if s and s.u == user and holds_seat(s) and tonumber(s.dl) > now
    and redis.call('HGET', user_key(user), sid) then
    return s
  end
  return nil
end

-- Whether a device call writes its session's progress (s already carries the call's
-- position): the session has a position, and the call stops, pauses, or reports a
-- position once the write interval has passed since the last write (or the start).
local function progress_due(s, action, position, pauses, now)
  if s.pos == '0' then
    return false
  end
  if action == 'stop' or pauses then
    return true
  end
  return position ~= '' and now - tonumber(s.pw or s.ct) >= tonumber(ARGV[9])
end

-- The progress keys of s's profile, if the call was given them.
local function progress_keys(s)
  local profile = s.u .. '/' .. s.p
  local hash, recent = PREFIX .. 'prog:' .. profile, PREFIX .. 'recent:' .. profile
  if DECLARED[hash] and DECLARED[recent] then
    return hash, recent
  end
  return nil
end

-- Writes s's progress in its title (s.pos; the duration the session was last told,
-- s.du, or else the one the entry has), marking it completed past the finish, and
-- appends 'playback.completed' when that finished it. The keys come from progress_keys.
local function write_session_progress(s, hash, recent, now)
  local duration = s.du or ''
  local before = redis.call('HGET', hash, s.c)
  local was_done = false
  if before then
    local entry = progress_entry(s.c, before)
    was_done = entry[4] == '1'
    if duration == '' then
      duration = entry[3]
    end
  end
  local done = '0'
  if duration ~= '' then
    local pos, dur = tonumber(s.pos), tonumber(duration)
    if pos >= tonumber(ARGV[10]) * dur or dur - pos <= tonumber(ARGV[11]) then
      done = '1'
    end
  end
  put_progress(hash, recent, s.c, s.pos, duration, done, s.d, now, ARGV[12], ARGV[13])
  s.pw = int(now)
  if done == '1' and not was_done then
    append_event('playback.completed', s, now)
  end
end

-- One device call, the one whose ARGV start at a: its reply.
local function device_call(a, now)
  PREFIX = ARGV[a + 8]
  STOP_CHANNEL = PREFIX .. 'stop'
  local action, user, sid, generation = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local position, reported, duration = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local brief = action == 'heartbeat' and ARGV[8] == 'brief'
  local s = beating_session(user, sid, now)
  if not s then
    local refused
    s, refused = live_session(user, sid, now)
    if not s then
      return refused
    end
  end
  if generation ~= '0' and generation ~= s.g then
    return {-4}
  end
  local key = session_key(sid)
  s.hb = int(now)
  if position ~= '' then
    s.pos = position
  end
  -- The title's duration, kept on the record ('du') once a call gives it.
  if duration ~= '' then
    s.du = duration
  end
  local state, playback = tonumber(s.st), nil
  local event
  if action == 'heartbeat' then
    if reported ~= '0' then
      playback = reported
    end
    -- A reported PAUSED pauses and PLAYING resumes, as the explicit calls do.
    local code, mode = tonumber(reported), ARGV[6]
    if code == PLAYBACK_PAUSED and state == ACTIVE then
      event = 'playback.paused'
    elseif code == PLAYBACK_PLAYING and state == PAUSED then
      event = 'playback.resumed'
    elseif mode == 'all'
      or (mode == 'sampled' and now - tonumber(s.he or s.ct) >= tonumber(ARGV[7])) then
      s.he = s.hb
      event = 'playback.heartbeat'
    end
  elseif action == 'pause' and state == ACTIVE then
    event, playback = 'playback.paused', tostring(PLAYBACK_PAUSED)
  elseif action == 'resume' and state == PAUSED then
    event, playback = 'playback.resumed', tostring(PLAYBACK_PLAYING)
  end
  -- Progress first: a call that lacks its profile's keys must leave before any write.
  if progress_due(s, action, position, event == 'playback.paused', now) then
    complete(s)
    local hash, recent = progress_keys(s)
    if not hash then
      return {-7, s.p}
    end
    write_session_progress(s, hash, recent, now)
  end
  if action == 'stop' then
    end_session(s, STOPPED, 'stopped_by_device', now)
    return {0, flat(s)}
  end
  if playback then
    s.ps = playback
  end
  if event == 'playback.paused' then
    s.st, s.pt = tostring(PAUSED), s.hb
  elseif event == 'playback.resumed' then
    s.st, s.pt = tostring(ACTIVE), nil
  end
  next_deadline(s, now, tonumber(ARGV[4]), tonumber(ARGV[5]))
  local stored = record(s)
  -- Without KEEPTTL: a live record has no TTL.
  redis.call('SET', key, stored)
  hold_until_deadline(s)
  if event then
    complete(s)
    append_event(event, s, now)
  end
  if brief then
    return {0, s.st, s.dl, s.pos, s.ps, s.hb, s.pt or ''}
  end
  return {0, flat(s, stored)}
end
