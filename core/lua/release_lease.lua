-- Give a lease up, only if the caller holds it. KEYS: lease. ARGV[1]: token. Returns 1 or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
