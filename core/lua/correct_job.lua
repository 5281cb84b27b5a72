-- Correct a queued or running job that Redis kept stale across a restart (its append-only file lost
-- the last changes, which the job's saved record has): replace the record with the saved one, or
-- drop it (the job was deleted). Only while the record is still the revision the caller compared.
-- KEYS: job, losses, lease, redispatch, succeeded jobs (by finish time). ARGV[1]: the revision
-- compared, [2]: the saved status ('' to drop the job), [3]: finish time if it succeeded else '',
-- then field/value pairs (no status). Returns 1 if corrected, 0 if the record changed meanwhile.
local status = redis.call('HGET', KEYS[1], 'status')
if redis.call('HGET', KEYS[1], 'revision') ~= ARGV[1] or (status ~= 'queued' and status ~= 'running') then
  return 0
end
local prefix, id = job_parts(KEYS[1])
set_status(KEYS[1], nil)
redis.call('DEL', KEYS[3], KEYS[4])  -- a stale run's lease, a stale resend
if ARGV[2] == '' then
  redis.call('ZREM', prefix .. ':jobs', id)
  redis.call('ZREM', prefix .. ':dataset:' .. redis.call('HGET', KEYS[1], 'dataset_id') .. ':jobs', id)
  redis.call('ZREM', KEYS[5], id)
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
redis.call('DEL', KEYS[1])
set_fields(KEYS[1], 4)
set_status(KEYS[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[5], ARGV[3], id) end
return 1
