-- ARGV: prefix, retry flag, n, then n x 15 job values (see ``store_new``).
-- Runs after core.lua and new.lua (composed by qmlkit_redis.lua).
local err = store_new(4, tonumber(ARGV[3]), ARGV[2])
if err then return err end
return {'OK'}
