-- Pending entries of one key group's outbox to take over (after outbox_entry.lua).
-- KEYS: outbox, retry zset, attempts. ARGV: group, consumer, "own"|"idle", min idle ms, count.
-- "own": this consumer's pending entries (a restart under the same name); "idle": XAUTOCLAIM from anyone.
-- Entries waiting in the retry zset are skipped: their retry is due later, through outbox_due.lua.
local found
if ARGV[3] == 'own' then
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[5], 'STREAMS', KEYS[1], '0')
  found = (r and r[1] and r[1][2]) or {}
else
  found = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], '0-0', 'COUNT', ARGV[5])[2]
end
local out = {}
for _, e in ipairs(found) do
  if type(e[2]) == 'table' and not redis.call('ZSCORE', KEYS[2], e[1]) then
    out[#out + 1] = _entry(e, KEYS[3])
  end
end
return out
