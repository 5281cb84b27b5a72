-- Store a job record rebuilt from its run folder, only if the job has none.
-- KEYS: job, succeeded jobs (by finish time). ARGV[1]: creation time, [2]: finish time if it
-- succeeded else "", [3]: status, then field/value pairs (no status). Returns 1 if stored, else 0.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
set_fields(KEYS[1], 4)
add_job(KEYS[1], ARGV[1])
set_status(KEYS[1], ARGV[3])
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[2], select(2, job_parts(KEYS[1]))) end
return 1
