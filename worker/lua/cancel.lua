-- Cancel: a queued job is cancelled at once; a running one is asked to stop (its run, or the
-- reaper if its run is gone, then ends it cancelled). A job that has ended is left as it is.
-- KEYS: job, active jobs. ARGV[1]: job id, [2]: finished_at.
-- Returns false (no such job) or {status before, the record after...}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2], 'cancel_requested', 'true')
  redis.call('SREM', KEYS[2], ARGV[1])
elseif status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
else
  return with_record(status, KEYS[1])
end
redis.call('HINCRBY', KEYS[1], 'revision', 1)
return with_record(status, KEYS[1])
