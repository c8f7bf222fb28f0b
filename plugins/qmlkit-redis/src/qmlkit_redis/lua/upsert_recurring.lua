-- ARGV: prefix, id, definition JSON, next µs or '', last µs or '', keep flag.
local P = ARGV[1]
if ARGV[6] == '1' and redis.call('HEXISTS', P .. 'recurring', ARGV[2]) == 1 then
  redis.call('HSET', P .. 'recurring', ARGV[2], ARGV[3])
  return 0
end
redis.call('HSET', P .. 'recurring', ARGV[2], ARGV[3])
redis.call('HSET', P .. 'recurring-next', ARGV[2], ARGV[4])
redis.call('HSET', P .. 'recurring-last', ARGV[2], ARGV[5])
return 1
