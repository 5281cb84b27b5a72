-- The queued and running jobs whose lease nobody holds: all that the reaper acts on. Leased jobs
-- (the running ones, normally) are passed over here, so a pass costs little however many run.
-- KEYS: queued jobs, running jobs (the status indexes). ARGV[1]: job key prefix ("p:job:").
-- Returns {id, status, worker, dispatch_id, enqueued_at, retry_at, ...} (an absent field as "").
local found = {}
for _, index in ipairs(KEYS) do
  for _, id in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    local key = ARGV[1] .. id
    if redis.call('EXISTS', key .. ':lease') == 0 then
      local fields = redis.call('HMGET', key, 'status', 'worker', 'dispatch_id', 'enqueued_at', 'retry_at')
      if fields[1] then
        table.insert(found, id)
        for i = 1, 5 do table.insert(found, fields[i] or '') end
      end
    end
  end
end
return found
