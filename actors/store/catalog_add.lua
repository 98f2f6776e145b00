-- Store a new version of a script (playbus.actors.store.catalog). KEYS: names set, script hash, generation.
-- ARGV: name, source. The first version of a script is also its active one. Returns the version number.
local v = redis.call('HINCRBY', KEYS[2], 'next', 1)
redis.call('HSET', KEYS[2], 'v:' .. v, ARGV[2])
redis.call('HSETNX', KEYS[2], 'active', v)
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[3])
return v
