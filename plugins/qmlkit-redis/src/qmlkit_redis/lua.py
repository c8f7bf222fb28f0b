"""The server-side Lua scripts of `qmlkit_redis.storage.RedisStorage`.

Every storage operation that must be atomic is one of these scripts: Redis runs a script
to its end before it serves any other command, so a script sees and leaves the keys in
one consistent state. Each script starts with `CORE` and `INDEX` (or `NEW`), local
helpers that keep the secondary indexes (queue sorted sets, state indexes, per-server
processing sets, counts, the due and expiry sorted sets) in step with the job hash.
Index writes are gathered and sent as one command per key at the end of a script
(``flush()``), so a batch of N jobs costs N hash writes plus a handful of index
commands; with a single job they go out at once, which is cheaper.

Conventions: ``ARGV[1]`` is the key prefix; times are integer microseconds since the Unix
epoch, passed and stored as decimal strings (never turned into Lua numbers, whose
string form keeps only 14 digits); a queue entry is ``<16-digit enqueued µs>:<job id>``
scored by ``-priority``, so ``ZPOPMIN``/``ZRANGE`` give priority first, then FIFO.
Scripts read every key they will write before their first write where they can, so a
key of a foreign type (``WRONGTYPE``) aborts them before anything has changed.
"""

from __future__ import annotations

#: Fields of a job hash, in the order the scripts return them (see ``storage.JOB_FIELDS``).
JOB_FIELDS = (
    "payload", "metadata", "method", "queue", "priority", "max_retries", "timeout_s",
    "created_at", "attempts", "retry_count", "expires_at", "state", "state_data", "progress",
)

_JOB_FIELDS_LUA = ", ".join(f"'{f}'" for f in JOB_FIELDS)

#: Key prefix, gathered index writes, counts and ``flush()``: what every script needs.
CORE = r"""
local P = ARGV[1]
local zrems, zadds, srems, sadds, cnts = {}, {}, {}, {}, {}
-- With one job to write, index commands go out at once (cheaper than gathering them);
-- with many, they are gathered per key and sent by flush().
local direct = false
local function push(acc, key, a, b)
  local t = acc[key]
  if not t then t = {}; acc[key] = t end
  t[#t + 1] = a
  if b ~= nil then t[#t + 1] = b end
end
local function zrem(key, m)
  if direct then redis.call('ZREM', key, m) else push(zrems, key, m) end
end
local function zadd(key, score, m)
  if direct then redis.call('ZADD', key, score, m) else push(zadds, key, score, m) end
end
local function srem(key, m)
  if direct then redis.call('SREM', key, m) else push(srems, key, m) end
end
local function sadd(key, m)
  if direct then redis.call('SADD', key, m) else push(sadds, key, m) end
end
local function count_now(f, d)
  if redis.call('HINCRBY', P .. 'counts', f, d) <= 0 then redis.call('HDEL', P .. 'counts', f) end
end
local function cnt(q, st, d)
  local f = q .. '|' .. st
  if direct then count_now(f, d) else cnts[f] = (cnts[f] or 0) + d end
end
local function each_chunk(cmd, acc, step)
  for key, t in pairs(acc) do
    for i = 1, #t, step do
      redis.call(cmd, key, unpack(t, i, math.min(i + step - 1, #t)))
    end
  end
end
local function flush()
  each_chunk('ZREM', zrems, 1000)
  each_chunk('SREM', srems, 1000)
  each_chunk('ZADD', zadds, 1000)
  each_chunk('SADD', sadds, 1000)
  for f, d in pairs(cnts) do
    if d ~= 0 then count_now(f, d) end
  end
  zrems, zadds, srems, sadds, cnts = {}, {}, {}, {}, {}
end
local function jk(id) return P .. 'job:' .. id end

"""

#: Moving a stored job between states with its indexes (``leave``/``enter``).
INDEX = r"""
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

local JOBF = {""" + _JOB_FIELDS_LUA + r"""}
local function append_job(out, id)
  out[#out + 1] = id
  local v = redis.call('HMGET', jk(id), unpack(JOBF))
  for i = 1, #JOBF do out[#out + 1] = v[i] end
end

-- Move job id (index fields h) to Enqueued now, its state JSON built around its queue
-- from pre and post; the job and its previous state are kept for moved_reply().
local moved = {}
local function requeue(id, h, pre, post, tm)
  moved[#moved + 1] = {id, redis.call('HGET', jk(id), 'state_data')}
  leave(id, h)
  enter(id, h, 'Enqueued', pre .. cjson.encode(h[2] or '?') .. post, tm, '', {})
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
"""

#: Storing new jobs (``store_new``), for enqueue and recurring ticks.
NEW = r"""
-- Store new jobs from ARGV[base...] (15 values each); returns nil or an error reply.
-- The hot path of a single enqueue: one EXISTS, one HSET of the non-empty fields, and
-- the index writes, gathered.
local NEWF = 15
local function store_new(base, n, retry)
  direct = n == 1
  local seen = {}
  local skip = {}
  for i = 0, n - 1 do
    local o = base + i * NEWF
    local id = ARGV[o]
    if seen[id] then return {'DUP', id} end
    seen[id] = true
    if redis.call('EXISTS', jk(id)) == 1 then
      -- A retried call whose first try was stored (its reply lost): the same job is
      -- there already, byte for byte, so it counts as stored; anything else is a duplicate.
      local had = redis.call('HMGET', jk(id), 'payload', 'created_at')
      if retry == '1' and had[1] == ARGV[o + 1] and had[2] == ARGV[o + 8] then
        skip[id] = true
      else
        return {'DUP', id}
      end
    end
  end
  for i = 0, n - 1 do
    local o = base + i * NEWF
    local id = ARGV[o]
    if not skip[id] then
      local q, created, x = ARGV[o + 4], ARGV[o + 8], ARGV[o + 11]
      local st, tm = ARGV[o + 12], ARGV[o + 14]
      local f = {'payload', ARGV[o + 1], 'metadata', ARGV[o + 2], 'method', ARGV[o + 3],
                 'queue', q, 'priority', ARGV[o + 5], 'max_retries', ARGV[o + 6],
                 'timeout_s', ARGV[o + 7], 'created_at', created, 'attempts', ARGV[o + 9],
                 'retry_count', ARGV[o + 10], 'state', st, 'state_data', ARGV[o + 13]}
      if st == 'Enqueued' then
        local qm = tm .. ':' .. id
        f[25] = 'qmember'; f[26] = qm
        zadd(P .. 'queue:' .. q, -(tonumber(ARGV[o + 5]) or 0), qm)
      else -- Scheduled (the only other state a new job may have)
        f[25] = 'due'; f[26] = tm
        zadd(P .. 'scheduled', tm, id)
      end
      if x ~= '' then
        f[27] = 'expires_at'; f[28] = x
        zadd(P .. 'expires', x, id)
      end
      redis.call('HSET', jk(id), unpack(f))
      zadd(P .. 'jobs', created, id)
      zadd(P .. 'state:' .. st, created, id)
      cnt(q, st, 1)
    end
  end
  flush()
  return nil
end
"""

#: The helpers of the scripts that move stored jobs.
LIB = CORE + INDEX

#: ARGV: prefix, retry flag, n, then n x 15 job values (see ``store_new``).
ENQUEUE = CORE + NEW + r"""
local err = store_new(4, tonumber(ARGV[3]), ARGV[2])
if err then return err end
return {'OK'}
"""

#: ARGV: prefix, limit, started µs, server, Processing state JSON, replay flag, queues...
#: Returns {replayed, n_foreign, foreign keys..., then per job: id, new attempts, JOB_FIELDS
#: as they were before the claim (so ``state_data`` is the previous state)}. With the
#: replay flag (a retry of a claim whose reply was lost), jobs still
#: held by exactly this claim (same state JSON under this server) are returned again
#: instead of claiming more (``replayed`` is 1, and JOB_FIELDS are current); if there are
#: none, a fresh claim is made.
CLAIM = LIB + r"""
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
for i = 7, #ARGV do queues[#queues + 1] = ARGV[i] end
if #queues == 0 then -- every queue with Enqueued jobs has a count
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
    redis.call('HSET', k, 'state', 'Processing', 'state_data', sj, 'attempts', a,
               'server', srv, 'started_at', started, 'qmember', '',
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
flush()
out[2] = #foreign
for i = #foreign, 1, -1 do table.insert(out, 3, foreign[i]) end
return out
"""

#: ARGV: prefix, n, then n x 7 values: id, token, state, state JSON, time, expires, retry
#: count ('' keeps it). Returns one code per item: 1 applied, 2 applied already by this
#: very token (a retried acknowledgement whose reply was lost), 0 stale.
TRANSITION = LIB + r"""
local n = tonumber(ARGV[2])
direct = n == 1
local out = {}
for i = 0, n - 1 do
  local o = 3 + i * 7
  local id, token, st = ARGV[o], ARGV[o + 1], ARGV[o + 2]
  local ok, h = pcall(idx, id)
  if not ok or not h then
    out[#out + 1] = 0
  elseif h[1] == 'Processing' and h[7] == token then
    local f = {'acked', token}
    if ARGV[o + 6] ~= '' then f[3] = 'retry_count'; f[4] = ARGV[o + 6] end
    expiry(id, ARGV[o + 5], f)
    leave(id, h)
    enter(id, h, st, ARGV[o + 3], ARGV[o + 4], '', f)
    out[#out + 1] = 1
  elseif h[8] == token and h[1] == st then
    out[#out + 1] = 2
  else
    out[#out + 1] = 0
  end
end
flush()
return out
"""

#: ARGV: prefix, id, expected state JSON, expected attempts, state, state JSON, time,
#: server, expires. Compare-and-set: 1 if applied (or found applied by this very state
#: JSON: a retry after a lost reply), 0 if the job changed since it was read (the caller
#: reads again), -1 if it is gone.
CHANGE_STATE = LIB + r"""
local id = ARGV[2]
local h = idx(id)
if not h then return -1 end
local cur = redis.call('HMGET', jk(id), 'state_data', 'attempts')
if cur[1] == ARGV[6] then return 1 end -- a retried call whose first try was applied
if (cur[1] or '') ~= ARGV[3] or (cur[2] or '') ~= ARGV[4] then return 0 end
local f = {}
expiry(id, ARGV[9], f)
leave(id, h)
enter(id, h, ARGV[5], ARGV[6], ARGV[7], ARGV[8], f)
flush()
return 1
"""

#: ARGV: prefix, now µs, padded now, limit, Enqueued JSON head, tail. Promotes due
#: Scheduled and AwaitingRetry jobs, earliest first; returns per job: previous state
#: JSON, id, JOB_FIELDS (after the change).
PROMOTE = LIB + r"""
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
"""

#: ARGV: prefix, mode ('stranded' or 'reclaim'), bound µs, padded now, Enqueued JSON
#: head, tail, then server names (stranded: excluded servers). Requeues Processing jobs:
#: 'stranded', those of every server not listed whose claim started before the bound;
#: 'reclaim', those of servers whose heartbeat is older than the bound (their registry
#: rows are removed). Returns per job: previous state JSON, id, JOB_FIELDS.
REQUEUE = LIB + r"""
local mode, bound, pad = ARGV[2], ARGV[3], ARGV[4]
local servers = {}
local bnum = tonumber(bound)
if mode == 'reclaim' then
  servers = redis.call('ZRANGEBYSCORE', P .. 'heartbeats', '-inf', '(' .. bound)
  for _, s in ipairs(servers) do
    redis.call('ZREM', P .. 'heartbeats', s)
    redis.call('HDEL', P .. 'servers', s)
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
      if mode == 'reclaim' or (tonumber(started) or 0) < bnum then
        requeue(id, h, ARGV[5], ARGV[6], pad)
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
"""

#: ARGV: prefix, now µs, limit. Deletes up to ``limit`` Succeeded/Failed/Deleted jobs
#: whose expiry is at or before now, with every index entry of theirs; returns how many.
DELETE_EXPIRED = LIB + r"""
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
"""

#: ARGV: prefix, id, definition JSON, next µs or '', last µs or '', keep flag.
UPSERT_RECURRING = r"""
local P = ARGV[1]
if ARGV[6] == '1' and redis.call('HEXISTS', P .. 'recurring', ARGV[2]) == 1 then
  redis.call('HSET', P .. 'recurring', ARGV[2], ARGV[3])
  return 0
end
redis.call('HSET', P .. 'recurring', ARGV[2], ARGV[3])
redis.call('HSET', P .. 'recurring-next', ARGV[2], ARGV[4])
redis.call('HSET', P .. 'recurring-last', ARGV[2], ARGV[5])
return 1
"""

#: ARGV: prefix, template id, expected next µs, new next µs, last µs ('' keeps it),
#: retry flag, 1 or 0 jobs, then the job's 15 values. Compare-and-set of the template's
#: next tick with the tick's job stored in the same script: 1 won, 0 lost, or an error.
FIRE_RECURRING = CORE + NEW + r"""
local id = ARGV[2]
if redis.call('HEXISTS', P .. 'recurring', id) == 0 then return {0} end
local nxt = redis.call('HGET', P .. 'recurring-next', id)
if nxt ~= ARGV[3] then
  -- A retried call whose first try won (its reply lost) finds its own result.
  if ARGV[6] == '1' and nxt == ARGV[4] and (ARGV[7] == '0'
      or redis.call('HGET', jk(ARGV[8]), 'payload') == ARGV[9]) then
    return {1}
  end
  return {0}
end
if ARGV[7] == '1' then
  local err = store_new(8, 1, ARGV[6])
  if err then return err end
end
redis.call('HSET', P .. 'recurring-next', id, ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', P .. 'recurring-last', id, ARGV[5]) end
return {1}
"""

#: ARGV: prefix, server id, now µs. 1 if the server is registered (heartbeat stored).
#: ARGV: prefix, id, token, progress JSON. Stores the progress of a running attempt,
#: fenced: 1 if stored, 0 if the job is not Processing under that token (or is gone).
PROGRESS = r"""
local k = ARGV[1] .. 'job:' .. ARGV[2]
local v = redis.call('HMGET', k, 'state', 'attempts')
if v[1] ~= 'Processing' or v[2] ~= ARGV[3] then return 0 end
redis.call('HSET', k, 'progress', ARGV[4])
return 1
"""

HEARTBEAT = r"""
local P = ARGV[1]
if redis.call('HEXISTS', P .. 'servers', ARGV[2]) == 0 then return 0 end
redis.call('ZADD', P .. 'heartbeats', ARGV[3], ARGV[2])
return 1
"""

#: Every script's name in this module, loaded by SHA (``EVALSHA``) on first use.
SCRIPTS = ("ENQUEUE", "CLAIM", "TRANSITION", "CHANGE_STATE", "PROMOTE", "REQUEUE", "PROGRESS",
           "DELETE_EXPIRED", "UPSERT_RECURRING", "FIRE_RECURRING", "HEARTBEAT")
