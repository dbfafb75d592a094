-- Start one attempt of a job: count it and mark the job running, atomically.
-- KEYS[1]  the job hash     KEYS[2]  the job counters ("event<TAB>engine<TAB>task" -> n)
-- KEYS[3]  the delayed set: a retrying job is begun once its backoff has ended, and
--          leaves the set then (it may come before the scheduler queues it)
-- KEYS[4]  the webhook deliveries: a job that goes dead here and named a webhook adds one
-- ARGV[1]  job id     ARGV[2]  now (ISO 8601)    ARGV[3]  worker id
-- ARGV[4]  TTL in seconds once terminal          ARGV[5]  events channel
-- ARGV[6]  error JSON written when the job has no attempt left
-- ARGV[7]  this attempt's id, new for every call: the same call sent again (the client
--          retries when a connection drops, even after Redis ran the script) finds its
--          own attempt running and gets the record back without counting it twice
-- ARGV[8]  the stream entry that delivered the job ("" where there is none: Celery). A
--          running job is begun again only by the entry that began it (its worker was
--          lost and the entry was taken over); any other entry of it is stale (say, the
--          one its failed attempt came by, taken over after a retry had queued the next)
--          and must not start a second attempt beside the running one
-- ARGV[9]  now (Unix ms): a retrying job whose backoff has not ended is not begun (the
--          delivery of its failed attempt, back because its worker was lost before it
--          acknowledged it); the scheduler queues it when it is due
-- Returns {"missing"}, {"skip", state} for a job that must not run (finished, cancelled,
-- or running from another entry), {"dead"} when a redelivered job is out of attempts, or
-- {"run", field, value, ...} with the whole record after the update.
local current = redis.call('HGET', KEYS[1], 'state')
if not current then
  return {'missing'}
end
if current == 'running' and redis.call('HGET', KEYS[1], 'attempt_id') == ARGV[7] then
  local out = redis.call('HGETALL', KEYS[1])
  table.insert(out, 1, 'run')
  return out
end
if current ~= 'queued' and current ~= 'retrying' and current ~= 'running' then
  return {'skip', current}
end
if current == 'retrying' then
  local due = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]) or 0)
  if due > tonumber(ARGV[9]) then
    return {'skip', current}
  end
end
if current == 'running' and ARGV[8] ~= '' then
  local began = redis.call('HGET', KEYS[1], 'entry')
  if began and began ~= '' and began ~= ARGV[8] then
    return {'skip', current}
  end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local max_attempts = tonumber(redis.call('HGET', KEYS[1], 'max_attempts') or '1')
local kind = redis.call('HMGET', KEYS[1], 'engine', 'task')
local counted = '\t' .. (kind[1] or '') .. '\t' .. (kind[2] or '')
if attempts > max_attempts then
  redis.call('HINCRBY', KEYS[2], 'dead' .. counted, 1)
  -- Only a redelivery gets here: every attempt so far was lost with its worker.
  redis.call('HSET', KEYS[1], 'state', 'dead', 'attempts', max_attempts,
             'error', ARGV[6], 'finished_at', ARGV[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  if redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
    redis.call('XADD', KEYS[4], '*', 'id', ARGV[1])
  end
  redis.call('PUBLISH', ARGV[5], cjson.encode({id = ARGV[1], state = 'dead', from = current}))
  return {'dead'}
end
if current == 'retrying' then redis.call('ZREM', KEYS[3], ARGV[1]) end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[2], 'worker', ARGV[3],
           'attempt_id', ARGV[7], 'entry', ARGV[8])
-- A new attempt starts clean: its own progress, no error or due time of the one before.
redis.call('HDEL', KEYS[1], 'progress', 'error', 'run_at')
redis.call('HINCRBY', KEYS[2], 'begun' .. counted, 1)
redis.call('PUBLISH', ARGV[5], cjson.encode({id = ARGV[1], state = 'running', from = current}))
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, 'run')
return out
