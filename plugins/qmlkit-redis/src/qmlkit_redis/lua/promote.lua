-- ARGV: prefix, now µs, padded now, limit, Enqueued JSON head, tail. Promotes due
-- Scheduled and AwaitingRetry jobs, earliest first; returns per job: previous state
-- JSON, id, JOB_FIELDS (after the change).
-- Runs after core.lua and index.lua (composed by qmlkit_redis.lua).
local now, pad, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
local due = {}
for _, key in ipairs({'scheduled', 'retries'}) do
  local r = redis.call('ZRANGEBYSCORE', P .. key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #r, 2 do due[#due + 1] = {tonumber(r[i + 1]), r[i], key} end
end
table.sort(due, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end)
for i = 1, math.min(limit, #due) do
  local id = due[i][2]
  local h = idx(id)
  if h and (h[1] == 'Scheduled' or h[1] == 'AwaitingRetry') then
    requeue(id, h, ARGV[5], ARGV[6], pad)
  else
    zrem(P .. due[i][3], id) -- stale entry
  end
end
return moved_reply()
