-- A running job whose run stopped goes back to the queue, to resume from its checkpoint; unless
-- a cancel was asked meanwhile (it ends cancelled) or its runs crashed too often (it fails).
-- KEYS: job, lease. ARGV[1]: the runner's lease token, or "" for a job whose lease is gone (then
-- only if nobody holds it); [2]: restart reason, [3]: enqueued_at, [4]: finished_at, [5]: "1" if
-- the run crashed (stopped without pausing the job), [6]: most crashes that are retried, [7] and
-- [8]: the error of a job that crashed too often, before and after its crash count; then
-- field/value pairs set on a job that goes back to the queue.
-- Returns false (nothing done) or the record after.
local holder = redis.call('GET', KEYS[2])
if ARGV[1] == '' then
  if holder then return false end
elseif holder ~= ARGV[1] then
  return false
end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return false end
if holder then redis.call('DEL', KEYS[2]) end
redis.call('HSET', KEYS[1], 'epoch', redis.call('HGET', KEYS[1], 'epochs_completed') or '0')
local crashes = tonumber(redis.call('HGET', KEYS[1], 'crashes') or '0')
if ARGV[5] == '1' then crashes = redis.call('HINCRBY', KEYS[1], 'crashes', 1) end
if redis.call('HGET', KEYS[1], 'cancel_requested') == 'true' then
  set_status(KEYS[1], 'cancelled')
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[4])
elseif crashes > tonumber(ARGV[6]) then
  set_status(KEYS[1], 'failed')
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[4], 'error', cjson.encode(ARGV[7] .. crashes .. ARGV[8]))
else
  set_status(KEYS[1], 'queued')
  redis.call('HSET', KEYS[1], 'restart_reason', ARGV[2], 'enqueued_at', ARGV[3])
  redis.call('HDEL', KEYS[1], 'worker', 'lease_token')
  redis.call('HINCRBY', KEYS[1], 'restarts', 1)
  set_fields(KEYS[1], 9)
end
return changed(KEYS[1])
