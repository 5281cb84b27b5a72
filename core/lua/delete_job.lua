-- Delete a job that has ended: its record, its losses, its lease and its index entries.
-- KEYS: job, losses, lease, redispatch, succeeded jobs (by finish time).
-- Returns 'missing', the status of a job that has not ended, or 'deleted'.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' or status == 'running' then return status end
local prefix, id = job_parts(KEYS[1])
set_status(KEYS[1], nil)
redis.call('ZREM', prefix .. ':jobs', id)
redis.call('ZREM', prefix .. ':dataset:' .. redis.call('HGET', KEYS[1], 'dataset_id') .. ':jobs', id)
redis.call('ZREM', KEYS[5], id)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 'deleted'
