-- Push a held lease's expiry out. KEYS: lease, job. ARGV[1]: token, [2]: TTL in ms.
-- 1: renewed; 2: it had lapsed (Redis was away, or lost the last renewal), nobody else took it
-- and the job is still running under this token: taken back; 0: lost.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder and redis.call('HGET', KEYS[2], 'status') == 'running'
   and redis.call('HGET', KEYS[2], 'lease_token') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
