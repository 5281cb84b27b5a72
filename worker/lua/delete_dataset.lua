-- Delete a dataset's record unless a queued or running job uses it.
-- KEYS: dataset, datasets, dataset's jobs. ARGV[1]: dataset id, [2]: job key prefix ("p:job:").
-- Returns {'missing'}, {'busy', job id} or {'deleted'}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
for _, job in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local status = redis.call('HGET', ARGV[2] .. job, 'status')
  if status == 'queued' or status == 'running' then return {'busy', job} end
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return {'deleted'}
