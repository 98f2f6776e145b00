-- Activate a version of a script (playbus.actors.store.catalog). KEYS: script hash, generation.
-- ARGV: version, percent. With percent 100 the version becomes the active one and any canary ends; below 100 it
-- becomes the canary (run by the users whose bucket falls under percent%), the active version unchanged.
-- Returns 1, or 0 when the script has no such version (nothing changes then).
if redis.call('HEXISTS', KEYS[1], 'v:' .. ARGV[1]) == 0 then return 0 end
if tonumber(ARGV[2]) >= 100 then
  redis.call('HSET', KEYS[1], 'active', ARGV[1])
  redis.call('HDEL', KEYS[1], 'canary', 'canary_percent')
else
  redis.call('HSET', KEYS[1], 'canary', ARGV[1], 'canary_percent', ARGV[2])
end
redis.call('INCR', KEYS[2])
return 1
