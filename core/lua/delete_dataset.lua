-- Delete a dataset's record unless a queued or running job uses it (the indexes of its jobs stay:
-- its ended jobs are still listed by dataset).
-- KEYS: dataset, datasets. ARGV[1]: dataset id. Returns {'missing'}, {'busy', job id} or {'deleted'}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
for _, status in ipairs({'queued', 'running'}) do
  local busy = redis.call('ZRANGE', KEYS[1] .. ':status:' .. status, 0, 0)
  if #busy > 0 then return {'busy', busy[1]} end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return {'deleted'}
