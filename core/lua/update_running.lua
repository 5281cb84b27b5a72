-- Fields of a running job (its progress), written only by the holder of its lease.
-- KEYS: job, lease. ARGV[1]: lease token, then field/value pairs. Returns 1 if written, else 0.
if redis.call('GET', KEYS[2]) ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return 0
end
set_fields(KEYS[1], 2)
redis.call('HINCRBY', KEYS[1], 'revision', 1)
return 1
