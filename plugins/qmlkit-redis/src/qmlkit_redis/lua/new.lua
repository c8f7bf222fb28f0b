-- Storing new jobs (``store_new``), for enqueue and recurring ticks.
-- Store the groups of new jobs from ARGV[o] to the end (see newjob.lua), all or none:
-- returns nil, or an error reply ({'DUP', id}) with nothing written. Every id is
-- checked before the first write (one EXISTS per thousand ids; each id alone only when
-- one of them is taken); index writes are gathered and sent by flush().
local function store_new(o, retry)
  local seen, keys, groups, last = {}, {}, {}, #ARGV
  while o <= last do
    groups[#groups + 1] = o
    local j1 = o + 13
    o = j1 + 3 * tonumber(ARGV[o + 12])
    for j = j1, o - 1, 3 do
      local id = ARGV[j]
      if seen[id] then return {'DUP', id} end
      seen[id] = true
      keys[#keys + 1] = jk(id)
    end
  end
  local taken = 0
  for i = 1, #keys, 1000 do
    taken = taken + redis.call('EXISTS', unpack(keys, i, math.min(i + 999, #keys)))
  end
  local skip = {}
  if taken > 0 then
    local i = 0
    for _, g in ipairs(groups) do
      for j = g + 13, g + 10 + 3 * tonumber(ARGV[g + 12]), 3 do
        i = i + 1
        if redis.call('EXISTS', keys[i]) == 1 then
          if not stored_before(keys[i], j, g, retry) then return {'DUP', ARGV[j]} end
          skip[i] = true
        end
      end
    end
  end
  local i = 0
  for _, g in ipairs(groups) do
    local q, created, x, st, tm = ARGV[g + 1], ARGV[g + 5], ARGV[g + 8], ARGV[g + 9], ARGV[g + 11]
    local enq = st == 'Enqueued'
    local score = -(tonumber(ARGV[g + 2]) or 0)
    local zq = slot(zadds, enq and P .. 'queue:' .. q or P .. 'scheduled')
    local zj, zs = slot(zadds, P .. 'jobs'), slot(zadds, P .. 'state:' .. st)
    local zx = x ~= '' and slot(zadds, P .. 'expires') or nil
    local f, nq, nj, ns, stored = new_fields(g), #zq, #zj, #zs, 0
    for j = g + 13, g + 10 + 3 * tonumber(ARGV[g + 12]), 3 do
      i = i + 1
      if not skip[i] then
        local id = ARGV[j]
        f[2] = ARGV[j + 1]; f[4] = ARGV[j + 2]
        if enq then
          local qm = tm .. ':' .. id
          f[26] = qm
          zq[nq + 1] = score; zq[nq + 2] = qm
        else -- Scheduled (the only other state a new job may have)
          zq[nq + 1] = tm; zq[nq + 2] = id
        end
        nq = nq + 2
        redis.call('HSET', keys[i], unpack(f))
        zj[nj + 1] = created; zj[nj + 2] = id; nj = nj + 2
        zs[ns + 1] = created; zs[ns + 2] = id; ns = ns + 2
        if zx then zx[#zx + 1] = x; zx[#zx + 1] = id end
        stored = stored + 1
      end
    end
    if stored > 0 then
      cnt(q, st, stored)
      if enq then wake(q) end
    end
  end
  flush()
  return nil
end
