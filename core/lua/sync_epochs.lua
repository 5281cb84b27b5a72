-- Make a running job's loss stream hold its run's epochs, written only by the holder of its lease.
-- The epochs the stream lacks are appended (stream ids are "<epoch>-0"). A stream with a hole
-- (Redis lost an entry, e.g. the last second of an everysec append-only file), with epochs the
-- run does not have, or that refuses an id (it remembers a deleted newer one) is written again
-- whole: a stream only takes ids above the last one it gave out. Then the job's fields are set.
-- KEYS: losses, job, lease. ARGV[1]: lease token, [2]: n, [3] to [n + 2]: the records of epochs
-- 1 to n (JSON), then field/value pairs. Returns how many entries were written, -1 if not the holder.
if redis.call('GET', KEYS[3]) ~= ARGV[1] or redis.call('HGET', KEYS[2], 'status') ~= 'running' then
  return -1
end
local n = tonumber(ARGV[2])

local function append(first)
  for epoch = first, n do
    local added = redis.pcall('XADD', KEYS[1], epoch .. '-0', 'epoch', epoch, 'record', ARGV[epoch + 2])
    if type(added) == 'table' and added.err then return false end
  end
  return true
end

local last = 0
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest > 0 then last = tonumber(string.match(newest[1][1], '^(%d+)')) end
local first = last + 1
if redis.call('XLEN', KEYS[1]) ~= last or last > n or not append(first) then
  redis.call('DEL', KEYS[1])
  first = 1
  append(first)
end
set_fields(KEYS[2], n + 3)
redis.call('HINCRBY', KEYS[2], 'revision', 1)
return n - first + 1
