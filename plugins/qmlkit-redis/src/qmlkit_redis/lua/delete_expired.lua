-- ARGV: prefix, now µs, limit. Deletes up to ``limit`` Succeeded/Failed/Deleted jobs
-- whose expiry is at or before now, with every index entry of theirs; returns how many.
-- Runs after core.lua and index.lua (composed by qmlkit_redis.lua).
local now, limit = ARGV[2], tonumber(ARGV[3])
local done, offset = 0, 0
local doomed = {}
while done < limit do
  local ids = redis.call('ZRANGEBYSCORE', P .. 'expires', '-inf', now, 'LIMIT', offset, 500)
  if #ids == 0 then break end
  offset = offset + #ids -- entries are removed only at the end: page past this chunk
  for _, id in ipairs(ids) do
    if done >= limit then break end
    local h = idx(id)
    if not h then
      doomed[#doomed + 1] = id -- a dangling entry: the job is gone
    elseif h[1] == 'Succeeded' or h[1] == 'Failed' or h[1] == 'Deleted' then
      leave(id, h)
      zrem(P .. 'jobs', id)
      doomed[#doomed + 1] = id
      redis.call('DEL', jk(id))
      done = done + 1
    end -- any other state is not expirable: kept
  end
end
for _, id in ipairs(doomed) do zrem(P .. 'expires', id) end
flush()
return done
