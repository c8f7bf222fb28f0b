-- ARGV: prefix, server id, now µs. 1 if the server is registered (heartbeat stored).
local P = ARGV[1]
if redis.call('HEXISTS', P .. 'servers', ARGV[2]) == 0 then return 0 end
redis.call('ZADD', P .. 'heartbeats', ARGV[3], ARGV[2])
return 1
