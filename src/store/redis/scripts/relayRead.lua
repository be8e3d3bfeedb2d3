-- relayRead: up to a count of the partition's events for one consumer of a consumer
-- group (the relay's group of one sink, made at the log's start on first use): first
-- those given out but not acknowledged for longer than min_idle (their consumer died, or
-- their delivery failed), then those not given out yet. Each stays pending in the
-- group, owned by this consumer, until XACK.
--
-- KEYS[1]  <prefix>events             STREAM the partition's event log
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   group
-- ARGV[5]   consumer
-- ARGV[6]   at most this many events
-- ARGV[7]   claim pending events idle for at least this long, ms
--
-- Returns {0, {id, {field, value, ...}}, ...}.

local stream = events_key()
local group, consumer, count, min_idle = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local claimed = redis.pcall('XAUTOCLAIM', stream, group, consumer, min_idle, '0-0', 'COUNT', count)
if type(claimed) == 'table' and claimed.err then
  if not string.find(claimed.err, 'NOGROUP') then
    return redis.error_reply(claimed.err)
  end
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  claimed = {'0-0', {}}
end
local reply = {0}
-- Entries deleted since they were given out come back empty (Redis 6.2) or apart
-- (Redis 7): either way they are not events any more.
for _, entry in ipairs(claimed[2]) do
  if entry and entry[2] then
    reply[#reply + 1] = entry
  end
end
local wanted = count - (#reply - 1)
if wanted > 0 then
  local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', wanted, 'STREAMS', stream, '>')
  if read then
    for _, entry in ipairs(read[1][2]) do
      reply[#reply + 1] = entry
    end
  end
end
return reply
