-- A queued job fails (its task could not be sent); a job that has moved on is left alone.
-- KEYS: job. ARGV: field/value pairs (no status). Returns false or the record.
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return false end
set_fields(KEYS[1], 1)
set_status(KEYS[1], 'failed')
return changed(KEYS[1])
