-- ARGV: prefix, id, expected state JSON, expected attempts, state, state JSON, time,
-- server, expires. Compare-and-set: 1 if applied (or found applied by this very state
-- JSON: a retry after a lost reply), 0 if the job changed since it was read (the caller
-- reads again), -1 if it is gone.
-- Runs after core.lua and index.lua (composed by qmlkit_redis.lua).
local id = ARGV[2]
local h = idx(id)
if not h then return -1 end
local cur = redis.call('HMGET', jk(id), 'state_data', 'attempts')
if cur[1] == ARGV[6] then return 1 end -- a retried call whose first try was applied
if (cur[1] or '') ~= ARGV[3] or (cur[2] or '') ~= ARGV[4] then return 0 end
local f = {}
expiry(id, ARGV[9], f)
leave(id, h)
enter(id, h, ARGV[5], ARGV[6], ARGV[7], ARGV[8], f)
flush()
return 1
