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
redis.call('PUBLISH', ARGV[4], cjson.encode({id = ARGV[1], state = 'running',
                                             progress = cjson.decode(ARGV[3])}))
return 1
