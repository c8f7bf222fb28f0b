-- New jobs (enqueue, recurring ticks) come in groups that share every value but id,
-- payload and metadata. A group at ARGV[o]: method, queue, priority, max_retries,
-- timeout_s, created_at µs, attempts, retry_count, expires_at µs or '', state name
-- (Enqueued or Scheduled), state JSON, state time (padded enqueued µs, or due µs), m,
-- then m x (id, payload, metadata); the next group starts at ARGV[o + 13 + 3m].
-- The hash fields of the group's jobs, with the per-job values to set for each job:
-- f[2] payload, f[4] metadata and, for Enqueued, f[26] the queue entry.
local function new_fields(o)
  local f = {'payload', '', 'metadata', '', 'method', ARGV[o], 'queue', ARGV[o + 1],
             'priority', ARGV[o + 2], 'max_retries', ARGV[o + 3], 'timeout_s', ARGV[o + 4],
             'created_at', ARGV[o + 5], 'attempts', ARGV[o + 6], 'retry_count', ARGV[o + 7],
             'state', ARGV[o + 9], 'state_data', ARGV[o + 10], 'due', ARGV[o + 11]}
  if ARGV[o + 9] == 'Enqueued' then f[25] = 'qmember' end
  if ARGV[o + 8] ~= '' then f[27] = 'expires_at'; f[28] = ARGV[o + 8] end
  return f
end
-- The hash k of the job at ARGV[j] (its id) in the group at ARGV[o] exists: whether it is
-- this same job, stored by the first try of a retried call whose reply was lost (same
-- payload, same creation time). Anything else is a duplicate id.
local function stored_before(k, j, o, retry)
  if retry ~= '1' then return false end
  local had = redis.call('HMGET', k, 'payload', 'created_at')
  return had[1] == ARGV[j + 1] and had[2] == ARGV[o + 5]
end
