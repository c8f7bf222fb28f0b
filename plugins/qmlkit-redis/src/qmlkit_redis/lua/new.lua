-- Storing new jobs (``store_new``), for enqueue and recurring ticks.
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
