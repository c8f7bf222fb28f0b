-- ARGV: prefix, retry flag, then one group of one new job (see newjob.lua).
-- Reply: {'OK'}, or {'DUP', id} with nothing written. The single enqueue's hot path:
-- straight-line, one EXISTS, one HSET and the index commands at once, without
-- core.lua's helpers (gathering index writes only pays with many jobs).
-- Runs after newjob.lua (composed by qmlkit_redis.lua).
local P, o, j = ARGV[1], 3, 16
local id = ARGV[j]
local k = P .. 'job:' .. id
if redis.call('EXISTS', k) == 1 then
  if stored_before(k, j, o, ARGV[2]) then return {'OK'} end
  return {'DUP', id}
end
local q, created, st, tm = ARGV[o + 1], ARGV[o + 5], ARGV[o + 9], ARGV[o + 11]
local f = new_fields(o)
f[2] = ARGV[j + 1]; f[4] = ARGV[j + 2]
if st == 'Enqueued' then
  f[26] = tm .. ':' .. id
  redis.call('HSET', k, unpack(f))
  redis.call('ZADD', P .. 'queue:' .. q, -(tonumber(ARGV[o + 2]) or 0), f[26])
  -- core.lua's wake(), inlined: a server that may be idle on q hears of the job now
  if redis.call('DEL', P .. 'idle:' .. q, P .. 'idle:*') > 0 then
    redis.call('PUBLISH', P .. 'wakeup', q)
  end
else -- Scheduled (the only other state a new job may have)
  redis.call('HSET', k, unpack(f))
  redis.call('ZADD', P .. 'scheduled', tm, id)
end
if f[28] then redis.call('ZADD', P .. 'expires', f[28], id) end
redis.call('ZADD', P .. 'jobs', created, id)
redis.call('ZADD', P .. 'state:' .. st, created, id)
local c = q .. '|' .. st
if redis.call('HINCRBY', P .. 'counts', c, 1) <= 0 then redis.call('HDEL', P .. 'counts', c) end
return {'OK'}
