-- ARGV: prefix, retry flag, then groups of new jobs (see newjob.lua).
-- Reply: {'OK'}, or {'DUP', id} with nothing written.
-- Runs after core.lua, newjob.lua and new.lua (composed by qmlkit_redis.lua).
local err = store_new(3, ARGV[2])
if err then return err end
return {'OK'}
