-- Record what a running attempt reports of its progress, and publish it.
-- KEYS[1]  the job hash
-- ARGV[1]  job id     ARGV[2]  the attempt's id (begin wrote it)
-- ARGV[3]  the report, JSON {"fraction", "message"}     ARGV[4]  events channel
-- Only the attempt that is running may report: a job cancelled, finished or begun again
-- by another worker keeps what it has. Returns 1 when recorded, 0 when not.
local state, attempt = unpack(redis.call('HMGET', KEYS[1], 'state', 'attempt_id'))
if state ~= 'running' or attempt ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'progress', ARGV[3])
-- The report goes out as written, not decoded here: Lua's cjson refuses JSON that Python
-- writes (a lone surrogate's escape, from a file name that is not UTF-8), and that would
-- fail the script after the HSET.
redis.call('PUBLISH', ARGV[4], '{"id":' .. cjson.encode(ARGV[1]) ..
           ',"state":"running","progress":' .. ARGV[3] .. '}')
return 1
