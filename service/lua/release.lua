-- Put a job whose time has come on its queue, once: whoever takes it off the delayed set
-- queues it, so gateways releasing side by side never queue a job twice.
-- KEYS[1]  the delayed set     KEYS[2]  the job hash     KEYS[3]  its queue
-- ARGV[1]  job id     ARGV[2]  "xadd" (an entry holding ARGV[3] on a stream) or "lpush"
--          (the message ARGV[3] onto a list, Celery's queues)
-- ARGV[4]  the time it was due at, as the caller read it (Unix ms): a job set aside again
--          since (a new retry) has a new time and is left for then
-- Returns 1 when queued; 0 when another gateway did, or when the job no longer waits
-- (cancelled, begun, or its record expired): then it only leaves the set; -1, writing
-- nothing, when the queue's key holds another kind of value (another program's key of
-- that name): the push would fail after the job left the set, and Redis does not undo a
-- script's writes, so the job would wait for good.
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or -1) ~= tonumber(ARGV[4]) then
  return 0
end
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'queued' and state ~= 'retrying' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local kind = redis.call('TYPE', KEYS[3])['ok']
local wanted = 'stream'
if ARGV[2] == 'lpush' then wanted = 'list' end
if kind ~= 'none' and kind ~= wanted then
  return -1
end
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] == 'lpush' then
  redis.call('LPUSH', KEYS[3], ARGV[3])
else
  redis.call('XADD', KEYS[3], '*', 'id', ARGV[3])
end
return 1
