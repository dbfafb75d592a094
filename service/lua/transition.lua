-- Move one job to a new state, only from the states allowed, in one atomic step.
-- KEYS[1]  the job hash     KEYS[2]  the job counters ("event<TAB>engine<TAB>task" -> n)
-- KEYS[3]  the delayed set: a job that ends leaves it (a cancelled delayed job)
-- KEYS[4]  the webhook deliveries: a job that ends and named a webhook adds one
-- ARGV[1]  job id            ARGV[2]  target state
-- ARGV[3]  allowed source states, comma separated
-- ARGV[4]  TTL in seconds once terminal (0: keep)
-- ARGV[5]  events channel    ARGV[6]  cancel channel
-- ARGV[7]  the attempt this outcome is of ("" for none): a runner's outcome is refused
--          when another attempt has begun since (its worker stalled past the lease, and
--          the job was taken over), so that only the running attempt ends the job
-- ARGV[8..] field, value pairs to write with the new state
-- Returns {1, previous state} when moved, {0, current state or ""} when refused. A job
-- already in the target state with these very fields was moved by this same call, sent
-- again (the client resends when a connection drops, even after Redis ran the script):
-- that returns {1, the state} again, and nothing is written, counted or published twice.
-- A terminal event carries the finished record (as "job") when it is at most this many
-- bytes, so that whoever waits on the job answers without reading it back.
local RECORD_IN_EVENT_MAX = 8192
local current = redis.call('HGET', KEYS[1], 'state')
if not current then
  return {0, ''}
end
if current == ARGV[2] and #ARGV > 7 then
  local same = true
  for i = 8, #ARGV, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then same = false end
  end
  if same then
    return {1, current}
  end
end
local allowed = false
for state in string.gmatch(ARGV[3], '[^,]+') do
  if state == current then allowed = true end
end
if not allowed then
  return {0, current}
end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'attempt_id') ~= ARGV[7] then
  return {0, current}
end
local fields = {'state', ARGV[2]}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  -- A terminal state: count it, let the record expire, and never release it.
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('ZREM', KEYS[3], ARGV[1])
  local kind = redis.call('HMGET', KEYS[1], 'engine', 'task')
  redis.call('HINCRBY', KEYS[2], ARGV[2] .. '\t' .. (kind[1] or '') .. '\t' .. (kind[2] or ''), 1)
  if redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
    redis.call('XADD', KEYS[4], '*', 'id', ARGV[1])
  end
end
local event = {id = ARGV[1], state = ARGV[2], from = current}
if ttl > 0 then
  local flat = redis.call('HGETALL', KEYS[1])
  local record, size = {}, 0
  for i = 1, #flat, 2 do
    record[flat[i]] = flat[i + 1]
    size = size + #flat[i] + #flat[i + 1]
  end
  if size <= RECORD_IN_EVENT_MAX then event.job = record end
end
redis.call('PUBLISH', ARGV[5], cjson.encode(event))
if ARGV[2] == 'cancelled' then
  -- Whoever holds the job stops it: interrupts it if it runs, drops it if it waits.
  redis.call('PUBLISH', ARGV[6], cjson.encode({id = ARGV[1], from = current}))
end
return {1, current}
