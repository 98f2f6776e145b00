-- Due timers of several key groups (playbus.actors.service.timer_firer): KEYS = per group its `timers` sorted set
-- and `timer_events` hash; ARGV = now (ms), the most timers per group. Returns per group its earliest due timers,
-- soonest first, as a flat array: id, event (msgpack), id, event, ... Reads only, but for one repair: a timer whose event is missing
-- (a hand-edited Redis) could never fire, and is removed so that it does not hold the others back.
local out = {}
for i = 1, #KEYS, 2 do
  local ids = redis.call('ZRANGE', KEYS[i], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
  local got = {}
  if #ids > 0 then
    local events = redis.call('HMGET', KEYS[i + 1], unpack(ids))
    for j = 1, #ids do
      if events[j] then
        got[#got + 1] = ids[j]
        got[#got + 1] = events[j]
      else
        redis.call('ZREM', KEYS[i], ids[j])
      end
    end
  end
  out[#out + 1] = got
end
return out
