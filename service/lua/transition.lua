-- Move one job to a new state, only from the states allowed, in one atomic step.
-- KEYS[1]  the job hash
-- ARGV[1]  job id            ARGV[2]  target state
-- ARGV[3]  allowed source states, comma separated
-- ARGV[4]  TTL in seconds once terminal (0: keep)
-- ARGV[5]  events channel    ARGV[6]  cancel channel
-- ARGV[7..] field, value pairs to write with the new state
-- Returns {1, previous state} when moved, {0, current state or ""} when refused.
local current = redis.call('HGET', KEYS[1], 'state')
if not current then
  return {0, ''}
end
local allowed = false
for state in string.gmatch(ARGV[3], '[^,]+') do
  if state == current then allowed = true end
end
if not allowed then
  return {0, current}
end
local fields = {'state', ARGV[2]}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local ttl = tonumber(ARGV[4])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
redis.call('PUBLISH', ARGV[5], cjson.encode({id = ARGV[1], state = ARGV[2], from = current}))
if ARGV[2] == 'cancelled' and current == 'running' then
  -- Whoever holds the running job interrupts it.
  redis.call('PUBLISH', ARGV[6], ARGV[1])
end
return {1, current}
