-- ARGV: prefix, limit, started µs, server, Processing state JSON, replay flag, push
-- flag, queues... With the push flag, a claim that comes back short marks its queues
-- idle (``idle:<queue>``, or ``idle:*`` with no queues given; see core.lua's wake()).
-- Returns {replayed, n_foreign, foreign keys..., then per job: id, new attempts, JOB_FIELDS
-- as they were before the claim (so ``state_data`` is the previous state)}. With the
-- replay flag (a retry of a claim whose reply was lost), jobs still
-- held by exactly this claim (same state JSON under this server) are returned again
-- instead of claiming more (``replayed`` is 1, and JOB_FIELDS are current); if there are
-- none, a fresh claim is made.
-- Runs after core.lua and index.lua (composed by qmlkit_redis.lua).
local limit, started, srv, sj = tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local out = {0, 0}
-- Redis does not undo a script that fails half way: check the keys written below first.
local pk = P .. 'processing:' .. srv
local pt = redis.call('TYPE', pk)['ok']
if pt ~= 'none' and pt ~= 'set' then
  return redis.error_reply('WRONGTYPE ' .. pk .. ' holds a ' .. pt .. ', not a set')
end
if ARGV[6] == '1' then
  local held = redis.call('SMEMBERS', P .. 'processing:' .. srv)
  local found = 0
  for _, id in ipairs(held) do
    if redis.call('HGET', jk(id), 'state_data') == sj then
      local v = redis.call('HMGET', jk(id), 'attempts', unpack(JOBF))
      out[#out + 1] = id
      for i = 1, #v do out[#out + 1] = v[i] end
      found = found + 1
    end
  end
  if found > 0 then out[1] = 1; return out end
end
local queues = {}
for i = 8, #ARGV do queues[#queues + 1] = ARGV[i] end
local every = #queues == 0
if every then -- every queue with Enqueued jobs has a count
  for _, f in ipairs(redis.call('HKEYS', P .. 'counts')) do
    local q = string.match(f, '^(.*)|Enqueued$')
    if q then queues[#queues + 1] = q end
  end
end
local picked = {}
if #queues == 1 then
  local r = redis.call('ZPOPMIN', P .. 'queue:' .. queues[1], limit)
  for i = 1, #r, 2 do picked[#picked + 1] = r[i] end
elseif #queues > 1 then
  local cands = {}
  for _, q in ipairs(queues) do
    local r = redis.call('ZRANGE', P .. 'queue:' .. q, 0, limit - 1, 'WITHSCORES')
    for i = 1, #r, 2 do cands[#cands + 1] = {tonumber(r[i + 1]), r[i], q} end
  end
  table.sort(cands, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
  for i = 1, math.min(limit, #cands) do
    local c = cands[i]
    redis.call('ZREM', P .. 'queue:' .. c[3], c[2])
    picked[#picked + 1] = c[2]
  end
end
local foreign = {}
local claimed = 0
direct = #picked == 1
for _, m in ipairs(picked) do
  local id = string.sub(m, 18)
  local k = jk(id)
  local v = redis.pcall('HMGET', k, 'state', 'queue', 'attempts', 'created_at', 'history',
                        unpack(JOBF))
  if v.err then
    foreign[#foreign + 1] = k
  elseif v[1] == 'Enqueued' then
    local q = v[2] or '?'
    local a = (tonumber(v[3]) or 0) + 1
    -- place/placed_at: the queue entry and its enqueue time, so a requeue (stranded,
    -- reclaimed) puts the job back at its place in the queue
    redis.call('HSET', k, 'state', 'Processing', 'state_data', sj, 'attempts', a,
               'server', srv, 'started_at', started, 'qmember', '', 'place', m,
               'placed_at', string.match(v[5 + 13] or '', '"enqueued_at":"([^"]*)"') or '',
               'history', (v[5] or '') .. (v[5 + 13] or '') .. '\n')
    zrem(P .. 'state:Enqueued', id)
    zadd(P .. 'state:Processing', tonumber(v[4]) or 0, id)  -- a hand-edited time cannot fail it
    cnt(q, 'Enqueued', -1)
    cnt(q, 'Processing', 1)
    sadd(P .. 'processing:' .. srv, id)
    out[#out + 1] = id
    out[#out + 1] = a
    for i = 6, 5 + #JOBF do out[#out + 1] = v[i] end
    claimed = claimed + 1
  end
  -- an entry whose job is gone or no longer Enqueued is stale: dropped by the pop
end
if claimed > 0 then sadd(P .. 'processing-servers', srv) end
if ARGV[7] == '1' and claimed < limit then
  if every then redis.call('SET', P .. 'idle:*', '1')
  else for _, q in ipairs(queues) do redis.call('SET', P .. 'idle:' .. q, '1') end end
end
flush()
out[2] = #foreign
for i = #foreign, 1, -1 do table.insert(out, 3, foreign[i]) end
return out
