-- Store a job record rebuilt from its run folder, only if the job has none.
-- KEYS: job, jobs, active jobs, succeeded jobs, dataset's jobs.
-- ARGV[1]: job id, [2]: creation score, [3]: "1" if active, [4]: finish score if succeeded else "",
-- then field/value pairs. Returns 1 if stored, else 0.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
set_fields(KEYS[1], 5)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
if ARGV[3] == '1' then redis.call('SADD', KEYS[3], ARGV[1]) end
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1]) end
return 1
