-- A queued job fails (its task could not be sent); a job that has moved on is left alone.
-- KEYS: job, active jobs. ARGV[1]: job id, then field/value pairs. Returns false or the record.
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return false end
set_fields(KEYS[1], 2)
redis.call('SREM', KEYS[2], ARGV[1])
return changed(KEYS[1])
