-- Set fields of an existing job (never a stub record for a job Redis lost).
-- KEYS: job. ARGV: field/value pairs. Returns 1 if written, 0 if there is no such job.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
set_fields(KEYS[1], 1)
redis.call('HINCRBY', KEYS[1], 'revision', 1)
return 1
