-- listProgress: a page of a profile's progress, most recently written first (titles of
-- one instant in descending order of their ids, as ZREVRANGE gives them).
--
-- KEYS[1]  <prefix>prog:<user>/<profile>    HASH content -> "pos,dur,done,updated_ms,device"
-- KEYS[2]  <prefix>recent:<user>/<profile>  ZSET content -> updated_ms
--
-- ARGV[1..3] see the prelude
-- ARGV[4]   the previous page's last write time, ms; '' for the first page
-- ARGV[5]   the previous page's last title
-- ARGV[6]   at most this many entries
--
-- Returns {0, entry, ...} (see progress_entry in the prelude). The whole index is read:
-- it holds at most the cap of titles (writeProgress).

local titles = redis.call('ZREVRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local after_ms = ARGV[4] ~= '' and tonumber(ARGV[4]) or nil
local limit = tonumber(ARGV[6])
local reply = {0}
for i = 1, #titles, 2 do
  if #reply > limit then
    break
  end
  local content, updated = titles[i], tonumber(titles[i + 1])
  if not after_ms or updated < after_ms or (updated == after_ms and content < ARGV[5]) then
    local value = redis.call('HGET', KEYS[1], content)
    if value then
      reply[#reply + 1] = progress_entry(content, value)
    end
  end
end
return reply
