-- Cancel: a queued job is cancelled at once; a running one is asked to stop (its run, or the
-- reaper if its run is gone, then ends it cancelled). A job that has ended is left as it is.
-- KEYS: job. ARGV[1]: finished_at. Returns false (no such job) or {status before, the record after...}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' then
  set_status(KEYS[1], 'cancelled')
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[1], 'cancel_requested', 'true')
elseif status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
else
  return with_record(status, KEYS[1])
end
redis.call('HINCRBY', KEYS[1], 'revision', 1)
return with_record(status, KEYS[1])
