-- Store new jobs and queue each one, atomically: all of them or none.
-- KEYS    per job, in order: its hash, then its queue (a stream or a list)
-- ARGV    per job, in order: op ("xadd" or "lpush"), value, n, then n field/value pairs
-- The caller has checked every job, so no command here can fail half-way.
local a = 1
for k = 1, #KEYS, 2 do
  local op, value, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local fields = {}
  for i = a + 3, a + 2 + 2 * n do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[k], unpack(fields))
  if op == 'xadd' then
    redis.call('XADD', KEYS[k + 1], '*', 'id', value)
  else
    redis.call('LPUSH', KEYS[k + 1], value)
  end
  a = a + 3 + 2 * n
end
return #KEYS / 2
