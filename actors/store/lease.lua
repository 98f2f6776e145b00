-- Take from a campaign budget's counter (playbus.actors.store.leases).
-- KEYS[1] counter; ARGV: block (wanted), need (the least that is of use), spread.
-- Takes the block when the counter can give it and spread blocks more, else a 1/spread share of what is
-- left if that covers `need`, else `need`, else everything that is left. Returns {taken, left after}.
local left = tonumber(redis.call('GET', KEYS[1]) or '0')
local block, need, spread = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local take = math.min(block, math.floor(left / spread))
if take < need then take = need end
if take > left then take = left end
if take <= 0 then return {0, left} end
redis.call('DECRBY', KEYS[1], take)
return {take, left - take}
