-- Key prefix, gathered index writes, counts and ``flush()``: what every script needs.
local P = ARGV[1]
local zrems, zadds, srems, sadds, cnts = {}, {}, {}, {}, {}
-- With one job to write, index commands go out at once (cheaper than gathering them);
-- with many, they are gathered per key and sent by flush().
local direct = false
local function slot(acc, key)
  local t = acc[key]
  if not t then t = {}; acc[key] = t end
  return t
end
local function push(acc, key, a, b)
  local t = slot(acc, key)
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
-- Push wake-ups: a queue whose last claim came back short (a server may be idle on it)
-- has an ``idle:<queue>`` key (``idle:*`` for a server of every queue); the first job
-- made runnable on it deletes the key and publishes the queue's name (qmlkit_redis.push).
local woke = {}
local function wake(q)
  if woke[q] then return end
  woke[q] = true
  if redis.call('DEL', P .. 'idle:' .. q, P .. 'idle:*') > 0 then
    redis.call('PUBLISH', P .. 'wakeup', q)
  end
end

