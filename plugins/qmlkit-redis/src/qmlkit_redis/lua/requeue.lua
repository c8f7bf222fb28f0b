-- ARGV: prefix, mode ('stranded' or 'reclaim'), bound µs, padded now, Enqueued JSON
-- head, tail, then server names (stranded: excluded servers). Requeues Processing jobs:
-- 'stranded', those of every server not listed whose claim started before the bound;
-- 'reclaim', those of servers whose heartbeat is older than the bound (their registry
-- rows are removed), and those of orphans (a 'name#uuid' stamp with no row) whose
-- claim started before the bound. Returns per job: previous state JSON, id, JOB_FIELDS.
-- Runs after core.lua and index.lua (composed by qmlkit_redis.lua).
local mode, bound, pad = ARGV[2], ARGV[3], ARGV[4]
local servers = {}
local bnum = tonumber(bound)
local dead = {}
if mode == 'reclaim' then
  servers = redis.call('ZRANGEBYSCORE', P .. 'heartbeats', '-inf', '(' .. bound)
  for _, s in ipairs(servers) do
    dead[s] = true
    redis.call('ZREM', P .. 'heartbeats', s)
    redis.call('HDEL', P .. 'servers', s)
  end
  -- orphans: a registered-id stamp ('name#uuid') with no row; only their claims
  -- started before the bound are taken (a server registering right now is not robbed)
  for _, s in ipairs(redis.call('SMEMBERS', P .. 'processing-servers')) do
    if not dead[s] and string.find(s, '#', 1, true)
        and redis.call('HEXISTS', P .. 'servers', s) == 0 then
      servers[#servers + 1] = s
    end
  end
else
  local excluded = {}
  for i = 7, #ARGV do excluded[ARGV[i]] = true end
  for _, s in ipairs(redis.call('SMEMBERS', P .. 'processing-servers')) do
    if not excluded[s] then servers[#servers + 1] = s end
  end
end
for _, s in ipairs(servers) do
  local pkey = P .. 'processing:' .. s
  for _, id in ipairs(redis.call('SMEMBERS', pkey)) do
    local h = idx(id)
    if h and h[1] == 'Processing' and h[5] == s then
      local started = redis.call('HGET', jk(id), 'started_at')
      if dead[s] or (tonumber(started) or 0) < bnum then
        requeue(id, h, ARGV[5], ARGV[6], pad, true)
      end
    else
      srem(pkey, id) -- stale entry
    end
  end
end
flush()
for _, s in ipairs(servers) do
  if redis.call('SCARD', P .. 'processing:' .. s) == 0 then
    redis.call('SREM', P .. 'processing-servers', s)
  end
end
return moved_reply()
