-- Record a running job's end (succeeded, failed or cancelled: each final). Only its run may: the
-- holder of its lease, or, when nobody holds it (it lapsed while Redis was away), the run whose
-- token the job still names. The caller's lease is released with the same write.
-- KEYS: job, succeeded jobs (by finish time), lease. ARGV[1]: lease token, [2]: the status,
-- [3]: finish time if it succeeded else "", then field/value pairs (no status).
-- Returns false (not written) or the record after.
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return false end
local holder = redis.call('GET', KEYS[3])
if holder ~= ARGV[1] and (holder or redis.call('HGET', KEYS[1], 'lease_token') ~= ARGV[1]) then
  return false
end
set_fields(KEYS[1], 4)
set_status(KEYS[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[2], ARGV[3], select(2, job_parts(KEYS[1]))) end
if holder then redis.call('DEL', KEYS[3]) end
return changed(KEYS[1])
