-- Prepended to every script of the job store (core.lua_scripts). A job is a hash with one field per
-- record field (core.records): status, dataset_id, lease_token and dispatch_id are plain
-- strings, every other value is JSON that the scripts pass through without reading it.
--
-- A job's key is "<prefix>:job:<id>"; its indexes are named from the same prefix, all sorted sets
-- scored by the job's creation time, so that every listing pages newest first without a scan:
-- <prefix>:jobs (every job), <prefix>:status:<status>, <prefix>:dataset:<dataset id>:jobs and
-- <prefix>:dataset:<dataset id>:status:<status>. (Scripts name keys they are not given: the
-- store runs on one Redis server, not a Cluster.)

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

-- The prefix and the id in a job's key.
local function job_parts(job_key)
  return string.match(job_key, '^(.*):job:([^:]+)$')
end

-- Put a job in `status` (nil: in none), in its record and in its status indexes, one change.
local function set_status(job_key, status)
  local prefix, id = job_parts(job_key)
  local old = redis.call('HGET', job_key, 'status')
  local per_dataset = prefix .. ':dataset:' .. redis.call('HGET', job_key, 'dataset_id') .. ':status:'
  if old then
    redis.call('ZREM', prefix .. ':status:' .. old, id)
    redis.call('ZREM', per_dataset .. old, id)
  end
  if status then
    local created = redis.call('ZSCORE', prefix .. ':jobs', id)
    redis.call('ZADD', prefix .. ':status:' .. status, created, id)
    redis.call('ZADD', per_dataset .. status, created, id)
    redis.call('HSET', job_key, 'status', status)
  end
end

-- List a new job by its creation time (before set_status, which reads it).
local function add_job(job_key, created)
  local prefix, id = job_parts(job_key)
  redis.call('ZADD', prefix .. ':jobs', created, id)
  redis.call('ZADD', prefix .. ':dataset:' .. redis.call('HGET', job_key, 'dataset_id') .. ':jobs', created, id)
end
