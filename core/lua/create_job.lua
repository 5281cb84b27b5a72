-- Store a new queued job, atomically with the checks that its dataset exists and the queue has room.
-- KEYS: dataset, job. ARGV[1]: creation time, [2]: most queued jobs, then field/value pairs (no status).
-- Returns the record, 0 (no such dataset) or -1 (the queue is full).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local prefix = job_parts(KEYS[2])
if redis.call('ZCARD', prefix .. ':status:queued') >= tonumber(ARGV[2]) then return -1 end
set_fields(KEYS[2], 3)
add_job(KEYS[2], ARGV[1])
set_status(KEYS[2], 'queued')
return changed(KEYS[2])
