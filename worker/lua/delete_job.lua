-- Delete a job that has ended: its record, its losses, its lease and its index entries.
-- KEYS: job, losses, lease, redispatch, jobs, succeeded jobs, active jobs, dataset's jobs.
-- ARGV[1]: job id. Returns 'missing', the status of a job that has not ended, or 'deleted'.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' or status == 'running' then return status end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('SREM', KEYS[7], ARGV[1])
redis.call('SREM', KEYS[8], ARGV[1])
return 'deleted'
