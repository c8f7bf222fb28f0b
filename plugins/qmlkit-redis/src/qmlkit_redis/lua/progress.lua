-- ARGV: prefix, id, token, progress JSON. Stores the progress of a running attempt,
-- fenced: 1 if stored, 0 if the job is not Processing under that token (or is gone).
local k = ARGV[1] .. 'job:' .. ARGV[2]
local v = redis.call('HMGET', k, 'state', 'attempts')
if v[1] ~= 'Processing' or v[2] ~= ARGV[3] then return 0 end
redis.call('HSET', k, 'progress', ARGV[4])
return 1
