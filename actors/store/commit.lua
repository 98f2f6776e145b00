-- The commit unit of playbus.actors.store.commit: every key group of a micro-batch in one call, each group its
-- own fenced, deduplicated unit (one group per call on Redis Cluster, where a call must stay in one slot).
-- One unit = one key group's share of a micro-batch, written by `unit(k, a)`:
-- KEYS from k: epoch, batch, users, then journal keys, then stream keys (outbox, failed, target streams).
-- ARGV from a: epoch, batch token, journal limit, #snapshots, #journal keys, #streams,
--       user_key/snapshot pairs, per journal key (count, entries oldest first),
--       per stream (KEYS index within the unit, 1-based; field; count; values).
-- A unit returns {"OK"}, {"DUP"} (this batch token was committed already: nothing written),
-- {"FENCED", current epoch} (the caller is not the owner: nothing written) or {"WRONGTYPE", key, its type}
-- (a key it would write holds another type: nothing written). Everything that can fail is checked before the
-- first write, and the batch token is written last, so a unit is all or nothing.
local function wrong_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then return t end
  return nil
end

local function unit(k0, a0)
  local cur = redis.call('GET', KEYS[k0])
  if cur ~= ARGV[a0] then return {'FENCED', cur or ''} end
  if redis.call('GET', KEYS[k0 + 1]) == ARGV[a0 + 1] then return {'DUP'} end
  local limit = tonumber(ARGV[a0 + 2])
  local nsnap, njour, nstream = tonumber(ARGV[a0 + 3]), tonumber(ARGV[a0 + 4]), tonumber(ARGV[a0 + 5])
  local first = a0 + 6
  -- Checks: the type of every key the unit writes, walking the arguments without writing.
  local bad
  if nsnap > 0 then bad = wrong_type(KEYS[k0 + 2], 'hash'); if bad then return {'WRONGTYPE', KEYS[k0 + 2], bad} end end
  local a = first + 2 * nsnap
  for k = k0 + 3, k0 + 2 + njour do
    bad = wrong_type(KEYS[k], 'list')
    if bad then return {'WRONGTYPE', KEYS[k], bad} end
    a = a + 1 + tonumber(ARGV[a])
  end
  for _ = 1, nstream do
    local key = KEYS[k0 - 1 + tonumber(ARGV[a])]
    bad = wrong_type(key, 'stream')
    if bad then return {'WRONGTYPE', key, bad} end
    a = a + 3 + tonumber(ARGV[a + 2])
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
  for k = k0 + 3, k0 + 2 + njour do
    local n = tonumber(ARGV[a])
    a = a + 1
    last = a + n - 1
    local len = 0
    while a <= last do
      local j = math.min(a + CHUNK - 1, last)
      len = redis.call('LPUSH', KEYS[k], unpack(ARGV, a, j))
      a = j + 1
    end
    if len > limit then redis.call('LTRIM', KEYS[k], 0, limit - 1) end
  end
  for _ = 1, nstream do
    local key, field, n = KEYS[k0 - 1 + tonumber(ARGV[a])], ARGV[a + 1], tonumber(ARGV[a + 2])
    a = a + 3
    for i = a, a + n - 1 do
      redis.call('XADD', key, '*', field, ARGV[i])
    end
    a = a + n
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
