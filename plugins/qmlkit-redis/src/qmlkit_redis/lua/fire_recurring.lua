-- ARGV: prefix, template id, expected next µs, new next µs, last µs ('' keeps it),
-- retry flag, 1 or 0 jobs, then the job as a group of one (see newjob.lua: its id is
-- ARGV[21], its payload ARGV[22]). Compare-and-set of the template's next tick with the
-- tick's job stored in the same script: 1 won, 0 lost, or an error.
-- Runs after core.lua, newjob.lua and new.lua (composed by qmlkit_redis.lua).
local id = ARGV[2]
if redis.call('HEXISTS', P .. 'recurring', id) == 0 then return {0} end
local nxt = redis.call('HGET', P .. 'recurring-next', id)
if nxt ~= ARGV[3] then
  -- A retried call whose first try won (its reply lost) finds its own result.
  if ARGV[6] == '1' and nxt == ARGV[4] and (ARGV[7] == '0'
      or redis.call('HGET', jk(ARGV[21]), 'payload') == ARGV[22]) then
    return {1}
  end
  return {0}
end
if ARGV[7] == '1' then
  local err = store_new(8, ARGV[6])
  if err then return err end
end
redis.call('HSET', P .. 'recurring-next', id, ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', P .. 'recurring-last', id, ARGV[5]) end
return {1}
