-- Deploy a script file (playbus.actors.store.catalog). KEYS: names set, script hash, generation.
-- ARGV: name, source. A file whose source differs from the one last loaded from it becomes a new active
-- version; an unchanged one leaves the active version alone. (A catalog written before "file" was kept
-- counts its version 1 as what was last loaded.) A new version from the file ends a canary under way.
-- Returns {1 if a new version was activated else 0, active}.
local h = KEYS[2]
local last = redis.call('HGET', h, 'file') or redis.call('HGET', h, 'v:1')
if last == ARGV[2] then
  return {0, tonumber(redis.call('HGET', h, 'active') or '0')}
end
local v = redis.call('HINCRBY', h, 'next', 1)
redis.call('HSET', h, 'v:' .. v, ARGV[2], 'active', v, 'file', ARGV[2])
redis.call('HDEL', h, 'canary', 'canary_percent')
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[3])
return {1, v}
