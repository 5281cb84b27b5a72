-- Prepended to every script of the job store (worker.scripts). A job is a hash with one field per
-- record field (worker.records): status, lease_token and dispatch_id are plain strings, every
-- other value is JSON that the scripts pass through without reading it.

-- Set the field/value pairs of ARGV from index `first` on; an empty value deletes the field.
local function set_fields(key, first)
  for i = first, #ARGV, 2 do
    if ARGV[i + 1] == '' then
      redis.call('HDEL', key, ARGV[i])
    else
      redis.call('HSET', key, ARGV[i], ARGV[i + 1])
    end
  end
end

-- Count a change of the job's record (a job.json never goes back to an older revision) and
-- return the record as it is now.
local function changed(key)
  redis.call('HINCRBY', key, 'revision', 1)
  return redis.call('HGETALL', key)
end

-- {first, the job's fields...}: a reply that carries a status besides the record.
local function with_record(first, key)
  local reply = redis.call('HGETALL', key)
  table.insert(reply, 1, first)
  return reply
end
