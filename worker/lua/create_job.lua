-- Store a new queued job, atomically with the checks that its dataset exists and the queue has room.
-- KEYS: dataset, job, jobs, dataset's jobs, active jobs.
-- ARGV[1]: job id, [2]: creation score, [3]: most queued jobs, [4]: job key prefix ("p:job:"),
-- then field/value pairs. Returns the record, 0 (no such dataset) or -1 (the queue is full).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local queued = 0
for _, job in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  if redis.call('HGET', ARGV[4] .. job, 'status') == 'queued' then queued = queued + 1 end
end
if queued >= tonumber(ARGV[3]) then return -1 end
set_fields(KEYS[2], 5)
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
return changed(KEYS[2])
