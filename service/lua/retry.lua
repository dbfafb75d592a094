-- Set a job aside until its next attempt is due: running -> retrying, atomically.
-- KEYS[1]  the job hash     KEYS[2]  the delayed set (id scored by when it is due)
-- KEYS[3]  the job counters ("event<TAB>engine<TAB>task" -> n)
-- ARGV[1]  job id           ARGV[2]  the attempt's id (begin wrote it)
-- ARGV[3]  the attempt's error, JSON        ARGV[4]  when it is due (ISO 8601)
-- ARGV[5]  when it is due (Unix ms)         ARGV[6]  events channel
-- Returns 1 when set aside, 0 when this attempt no longer runs (cancelled meanwhile, or
-- another attempt took over). The same call sent again (the client resends when a
-- connection drops, even after Redis ran the script) finds it done: 1, nothing redone.
local state, attempt = unpack(redis.call('HMGET', KEYS[1], 'state', 'attempt_id'))
if attempt ~= ARGV[2] then
  return 0
end
if state == 'retrying' and redis.call('HGET', KEYS[1], 'run_at') == ARGV[4] then
  return 1
end
if state ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'retrying', 'error', ARGV[3], 'run_at', ARGV[4])
redis.call('HDEL', KEYS[1], 'progress')  -- the failed attempt's; the next reports its own
redis.call('ZADD', KEYS[2], tonumber(ARGV[5]), ARGV[1])
local kind = redis.call('HMGET', KEYS[1], 'engine', 'task')
redis.call('HINCRBY', KEYS[3], 'retried\t' .. (kind[1] or '') .. '\t' .. (kind[2] or ''), 1)
redis.call('PUBLISH', ARGV[6], cjson.encode({id = ARGV[1], state = 'retrying', from = state}))
return 1
