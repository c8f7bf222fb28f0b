-- ARGV: prefix, n, then n x 7 values: id, token, state, state JSON, time, expires, retry
-- count ('' keeps it). Returns one code per item: 1 applied, 2 applied already by this
-- very token (a retried acknowledgement whose reply was lost), 0 stale.
-- Runs after core.lua and index.lua (composed by qmlkit_redis.lua).
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
