-- Moving a stored job between states with its indexes (``leave``/``enter``).
-- What the index helpers need of a job: HMGET jk(id) unpack(IDX).
local IDX = {'state', 'queue', 'priority', 'created_at', 'server', 'qmember', 'attempts', 'acked'}
local function idx(id)
  local h = redis.call('HMGET', jk(id), unpack(IDX))
  if not h[1] then return nil end
  return h
end

-- Take the job out of the indexes of its current state h[1].
local function leave(id, h)
  local st, q = h[1], h[2] or '?'
  if st == 'Enqueued' then
    if h[6] and h[6] ~= '' then zrem(P .. 'queue:' .. q, h[6]) end
  elseif st == 'Scheduled' then zrem(P .. 'scheduled', id)
  elseif st == 'AwaitingRetry' then zrem(P .. 'retries', id)
  elseif st == 'Processing' then
    if h[5] and h[5] ~= '' then srem(P .. 'processing:' .. h[5], id) end
  end
  zrem(P .. 'state:' .. st, id)
  cnt(q, st, -1)
end

-- Put the job in state st: its indexes, plus the fields f (a flat list) written with it.
-- tm: the state's time (padded enqueued µs for Enqueued, due µs for Scheduled and
-- AwaitingRetry, started µs for Processing); srv: the server for Processing.
local function enter(id, h, st, sj, tm, srv, f)
  local q = h[2] or '?'
  local qm, server, started, due = '', '', '', ''
  if st == 'Enqueued' then
    qm = tm .. ':' .. id
    zadd(P .. 'queue:' .. q, -(tonumber(h[3]) or 0), qm)
    wake(q)
  elseif st == 'Scheduled' then zadd(P .. 'scheduled', tm, id); due = tm
  elseif st == 'AwaitingRetry' then zadd(P .. 'retries', tm, id); due = tm
  elseif st == 'Processing' then
    sadd(P .. 'processing:' .. srv, id); sadd(P .. 'processing-servers', srv)
    server, started = srv, tm
  end
  zadd(P .. 'state:' .. st, tonumber(h[4]) or 0, id)
  cnt(q, st, 1)
  -- the state being left goes to the history: one JSON state per line
  local was = redis.call('HMGET', jk(id), 'state_data', 'history')
  if was[1] then f[#f + 1] = 'history'; f[#f + 1] = (was[2] or '') .. was[1] .. '\n' end
  if (st == 'Succeeded' or st == 'Failed') and tm ~= '' then -- per-minute throughput
    redis.call('HINCRBY', P .. 'stats:' .. tm, st, 1)
    redis.call('ZADD', P .. 'stats-minutes', tm, tm)
  end
  local n = #f
  f[n + 1] = 'state'; f[n + 2] = st; f[n + 3] = 'state_data'; f[n + 4] = sj
  f[n + 5] = 'qmember'; f[n + 6] = qm; f[n + 7] = 'server'; f[n + 8] = server
  f[n + 9] = 'started_at'; f[n + 10] = started; f[n + 11] = 'due'; f[n + 12] = due
  redis.call('HSET', jk(id), unpack(f))
end

-- Set or clear the expiry (x: µs string or '') into the field list f and the index.
local function expiry(id, x, f)
  if x ~= '' then zadd(P .. 'expires', x, id) else zrem(P .. 'expires', id) end
  f[#f + 1] = 'expires_at'; f[#f + 1] = x
end

local JOBF = {'payload', 'metadata', 'method', 'queue', 'priority', 'max_retries', 'timeout_s', 'created_at', 'attempts', 'retry_count', 'expires_at', 'state', 'state_data', 'progress'}
local function append_job(out, id)
  out[#out + 1] = id
  local v = redis.call('HMGET', jk(id), unpack(JOBF))
  for i = 1, #JOBF do out[#out + 1] = v[i] end
end

-- Move job id (index fields h) to Enqueued now, its state JSON built around its queue
-- from pre and post; the job and its previous state are kept for moved_reply(). With
-- keep (a Processing job requeued), it goes back to the place its claim took it from
-- (the 'place' entry and 'placed_at' time the claim recorded), when known.
local moved = {}
local function requeue(id, h, pre, post, tm, keep)
  local sj = pre .. cjson.encode(h[2] or '?') .. post
  if keep then
    local pl = redis.call('HMGET', jk(id), 'place', 'placed_at')
    if pl[1] and pl[1] ~= '' and pl[2] and pl[2] ~= '' then
      tm = string.sub(pl[1], 1, 16)
      sj = (string.gsub(sj, '"enqueued_at":"[^"]*"', '"enqueued_at":"' .. pl[2] .. '"', 1))
    end
  end
  moved[#moved + 1] = {id, redis.call('HGET', jk(id), 'state_data')}
  leave(id, h)
  enter(id, h, 'Enqueued', sj, tm, '', {})
end
-- The reply of a script that requeued: per job, previous state JSON, id, JOB_FIELDS.
local function moved_reply()
  flush()
  local res = {}
  for _, m in ipairs(moved) do
    res[#res + 1] = m[2]
    append_job(res, m[1])
  end
  return res
end
