-- The task message ARGV[1] was taken by a worker (or never went out): none is on its way now,
-- unless a newer one was sent meanwhile. KEYS: job. Returns 1 if it was the newest, else 0.
if redis.call('HGET', KEYS[1], 'dispatch_id') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'dispatch_id')
return 1
