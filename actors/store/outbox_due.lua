-- Due retries of one key group's outbox (after outbox_entry.lua).
-- KEYS: retry zset, outbox, attempts. ARGV: now ms, lease-until ms, limit.
-- Due entries are re-scored to the lease end (not removed): a deliverer dying mid-try only delays them.
-- Returns {entry id, payload, attempts, kind} (see outbox_entry.lua); entries gone from the outbox are dropped from the zset.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  local e = redis.call('XRANGE', KEYS[2], id, id)
  if #e == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    out[#out + 1] = _entry(e[1], KEYS[3])
  end
end
return out
