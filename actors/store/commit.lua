-- The commit unit of playbus.actors.store.commit: every key group of a micro-batch in one call, each group its
-- own fenced, deduplicated unit (one group per call on Redis Cluster, where a call must stay in one slot).
-- One unit = one key group's share of a micro-batch, written by `unit(k, a)`:
-- KEYS from k: epoch, batch, users, journal, input, offset, timers, timer events, stats, failed runs, then the streams
--       it appends to
--       (outbox, failed, rejected, target streams, other groups' input partitions for the events rules sent).
-- ARGV from a: epoch, batch token, #snapshots, journal entry ("" for none), journal max length, input offset
--       ("" for none), #streams, #timer changes, the events the journal entry's runs decided ("" for none: written
--       as its field "e" beside "d", for backtests), then user_key/snapshot pairs, then per stream (KEYS index within
--       the unit, 1-based; field; count; values), then the timer changes in order: "S", event id, due ms, event
--       (set: the sorted set's member and score, the event in the hash) or "D", event id (delete), then
--       #stats and field/increment pairs for the group's counters (HINCRBY), then #replayed and the ids of the
--       failed-runs entries whose replay this batch ran (XDEL: a replay runs once).
-- A unit returns {"OK"}, {"DUP"} (this batch token was committed already: nothing written),
-- {"FENCED", current epoch} (the caller is not the owner: nothing written) or {"WRONGTYPE", key, its type}
-- (a key it would write holds another type: nothing written). Everything that can fail is checked before the
-- first write, and the batch token is written last, so a unit is all or nothing. The input offset (the last
-- entry of the group's input stream this batch consumed) is written in the same unit: consume, decide and
-- commit are one step, and what it consumed is trimmed from the input.
local function wrong_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then return t end
  return nil
end

local function unit(k0, a0)
  local cur = redis.call('GET', KEYS[k0])
  if cur ~= ARGV[a0] then return {'FENCED', cur or ''} end
  if redis.call('GET', KEYS[k0 + 1]) == ARGV[a0 + 1] then return {'DUP'} end
  local nsnap, journal, maxlen = tonumber(ARGV[a0 + 2]), ARGV[a0 + 3], ARGV[a0 + 4]
  local offset, nstream, ntimer = ARGV[a0 + 5], tonumber(ARGV[a0 + 6]), tonumber(ARGV[a0 + 7])
  local recorded = ARGV[a0 + 8]
  local first = a0 + 9
  -- Checks: the type of every key the unit writes, walking the arguments without writing.
  local checks = {}
  if nsnap > 0 then checks[#checks + 1] = {KEYS[k0 + 2], 'hash'} end
  if journal ~= '' then checks[#checks + 1] = {KEYS[k0 + 3], 'stream'} end
  if offset ~= '' then
    checks[#checks + 1] = {KEYS[k0 + 4], 'stream'}
    checks[#checks + 1] = {KEYS[k0 + 5], 'string'}
  end
  if ntimer > 0 then
    checks[#checks + 1] = {KEYS[k0 + 6], 'zset'}
    checks[#checks + 1] = {KEYS[k0 + 7], 'hash'}
  end
  checks[#checks + 1] = {KEYS[k0 + 8], 'hash'}
  checks[#checks + 1] = {KEYS[k0 + 9], 'stream'}
  local a = first + 2 * nsnap
  for _ = 1, nstream do
    checks[#checks + 1] = {KEYS[k0 - 1 + tonumber(ARGV[a])], 'stream'}
    a = a + 3 + tonumber(ARGV[a + 2])
  end
  for i = 1, #checks do
    local bad = wrong_type(checks[i][1], checks[i][2])
    if bad then return {'WRONGTYPE', checks[i][1], bad} end
  end
  -- Writes.
  local CHUNK = 1000  -- even, and well under Lua's unpack limit
  a = first
  local last = a + 2 * nsnap - 1
  while a <= last do
    local j = math.min(a + CHUNK - 1, last)
    redis.call('HSET', KEYS[k0 + 2], unpack(ARGV, a, j))
    a = j + 1
  end
  if journal ~= '' and recorded ~= '' then
    redis.call('XADD', KEYS[k0 + 3], 'MAXLEN', '~', maxlen, '*', 'd', journal, 'e', recorded)
  elseif journal ~= '' then
    redis.call('XADD', KEYS[k0 + 3], 'MAXLEN', '~', maxlen, '*', 'd', journal)
  end
  for _ = 1, nstream do
    local key, field, n = KEYS[k0 - 1 + tonumber(ARGV[a])], ARGV[a + 1], tonumber(ARGV[a + 2])
    a = a + 3
    for i = a, a + n - 1 do
      redis.call('XADD', key, '*', field, ARGV[i])
    end
    a = a + n
  end
  for _ = 1, ntimer do
    if ARGV[a] == 'S' then
      redis.call('ZADD', KEYS[k0 + 6], ARGV[a + 2], ARGV[a + 1])
      redis.call('HSET', KEYS[k0 + 7], ARGV[a + 1], ARGV[a + 3])
      a = a + 4
    else
      redis.call('ZREM', KEYS[k0 + 6], ARGV[a + 1])
      redis.call('HDEL', KEYS[k0 + 7], ARGV[a + 1])
      a = a + 2
    end
  end
  local nstats = tonumber(ARGV[a])
  for i = a + 1, a + 2 * nstats, 2 do
    redis.call('HINCRBY', KEYS[k0 + 8], ARGV[i], ARGV[i + 1])
  end
  a = a + 1 + 2 * nstats
  local nxdel = tonumber(ARGV[a])
  if nxdel > 0 then redis.call('XDEL', KEYS[k0 + 9], unpack(ARGV, a + 1, a + nxdel)) end
  if offset ~= '' then
    redis.call('SET', KEYS[k0 + 5], offset)
    redis.call('XTRIM', KEYS[k0 + 4], 'MINID', offset)
  end
  redis.call('SET', KEYS[k0 + 1], ARGV[a0 + 1])
  return {'OK'}
end

-- ARGV[1] = #units, then per unit: #keys, #args, its args (KEYS are the units' keys, concatenated).
local out, k, a = {}, 1, 2
for u = 1, tonumber(ARGV[1]) do
  local nk, na = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  out[u] = unit(k, a + 2)
  k, a = k + nk, a + 2 + na
end
return out
