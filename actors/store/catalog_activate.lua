-- Activate a version of a script (playbus.actors.store.catalog). KEYS: script hash, generation.
-- ARGV: version. Returns 1, or 0 when the script has no such version (nothing changes then).
if redis.call('HEXISTS', KEYS[1], 'v:' .. ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'active', ARGV[1])
redis.call('INCR', KEYS[2])
return 1
