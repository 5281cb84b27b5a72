-- A queued job becomes running under the caller's lease (started_at kept from an earlier run).
-- A running job is not taken over here: if its run is gone, the reaper puts it back first.
-- KEYS: job, lease. ARGV[1]: lease token, [2]: started_at, then field/value pairs (where it runs).
-- Returns false (no such job) or {status before ('unleased' if the caller's lease is gone), the
-- record after...}: only 'queued' means the caller runs the job.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status ~= 'queued' then return with_record(status, KEYS[1]) end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return with_record('unleased', KEYS[1]) end
set_status(KEYS[1], 'running')
redis.call('HSET', KEYS[1], 'lease_token', ARGV[1])
set_fields(KEYS[1], 3)
if redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
redis.call('HINCRBY', KEYS[1], 'revision', 1)
return with_record(status, KEYS[1])
