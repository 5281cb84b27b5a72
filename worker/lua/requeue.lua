-- A running job whose run stopped goes back to the queue, to resume from its checkpoint; unless
-- a cancel was asked meanwhile (it ends cancelled) or its runs crashed too often (it fails).
-- KEYS: job, lease, active jobs. ARGV[1]: the runner's lease token, or "" for a job whose lease
-- is gone (then only if nobody holds it); [2]: job id, [3]: restart reason, [4]: enqueued_at,
-- [5]: finished_at, [6]: "1" if the run crashed (stopped without pausing the job), [7]: most
-- crashes that are retried, [8] and [9]: the error of a job that crashed too often, before and
-- after its crash count. Returns false (nothing done) or the record after.
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
if ARGV[6] == '1' then crashes = redis.call('HINCRBY', KEYS[1], 'crashes', 1) end
if redis.call('HGET', KEYS[1], 'cancel_requested') == 'true' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[5])
  redis.call('SREM', KEYS[3], ARGV[2])
elseif crashes > tonumber(ARGV[7]) then
  local error = cjson.encode(ARGV[8] .. crashes .. ARGV[9])
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[5], 'error', error)
  redis.call('SREM', KEYS[3], ARGV[2])
else
  redis.call('HSET', KEYS[1], 'status', 'queued', 'restart_reason', ARGV[3], 'enqueued_at', ARGV[4])
  redis.call('HDEL', KEYS[1], 'worker', 'lease_token')
  redis.call('HINCRBY', KEYS[1], 'restarts', 1)
  redis.call('SADD', KEYS[3], ARGV[2])
end
return changed(KEYS[1])
