-- Store new jobs and queue each one, atomically: all of them or none.
-- KEYS[1]  the index of every job (a sorted set of job ids; ids sort by creation)
-- KEYS[2]  the job counters (a hash: "submitted<TAB>engine<TAB>task" -> count)
-- KEYS     then per job, in order: its hash, then its queue (a stream or a list); then,
--          for a submit with an Idempotency-Key (one job), the key's record
-- ARGV[1]  the prefix of job hashes (the hash of job ID is prefix .. ID)
-- ARGV[2]  the channel that announces new jobs: one message per call, {"state": "queued",
--          "ids": [...]}, for live views (only they subscribe, so a submit stays cheap)
-- ARGV[3]  the most jobs a queue may hold (0: no limit): a job whose queue is that full
--          is refused with everything else in the call (back-pressure)
-- ARGV     then per job, in order: op, value, m, then the m keys that together hold the
--          job's queue (one per priority level: the queue's length is theirs summed; none
--          when there is no limit), n,
--          then n field/value pairs; then, with a key: the job's id, the request's
--          fingerprint and the key's TTL in seconds
--   op "xadd": add an entry holding the job's id (value) to the stream
--   op "xadd-job": the same, plus the fields a cluster dispatcher launches the job with,
--     so that it need not read the record first
--   op "lpush": push value (a Celery message) onto the list
--   op "delay": add the job's id to the delayed set (its "queue" key) scored by value,
--     when it is due (Unix ms); a gateway queues it then
-- The caller has checked every job, so no command here can fail half-way.
-- A job whose hash exists already is left alone: ids are new per submit, so that is this
-- very call sent again (the client retries when a connection drops, even after Redis ran
-- the script), and writing it twice would reset a job already begun and queue it twice.
-- Returns {"created"}, or {"replay", fingerprint, field, value, ...} with the record of
-- the job the Idempotency-Key already stands for, when that job still exists, or {"full",
-- n, length}: the n-th job's queue holds length jobs, the limit, or {"taken", n}: the
-- n-th job's queue key holds another kind of value (another program's key of that name).
-- Then nothing is written.
local launch_fields = {task = true, kind = true, engine = true, queue = true,
                       options = true, timeout_s = true}
-- Index entries of jobs whose record has expired are dropped as they are met: listing
-- meets some, and each new job samples this many, which keeps the stale entries at about
-- as many as the live ones at most, however many jobs expire.
local INDEX_SAMPLE = 2
local index, stats, prefix, announce = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local jobs = math.floor((#KEYS - 2) / 2)
local once = (#KEYS - 2) % 2 == 1 and KEYS[#KEYS] or nil
local tail = #ARGV - 2  -- where the key's arguments start, when there is a key
if once then
  local held = redis.call('GET', once)
  if held then
    local id, fingerprint = string.match(held, '^(%S+) (%S+)$')
    local record = id and redis.call('HGETALL', prefix .. id) or {}
    if #record > 0 then
      table.insert(record, 1, fingerprint)
      table.insert(record, 1, 'replay')
      return record
    end
  end
end
-- What each op writes to: checked before anything is written, so that no command below
-- fails on a key of another kind half-way through.
local kinds = {xadd = 'stream', ['xadd-job'] = 'stream', lpush = 'list', delay = 'zset'}
do
  local a = 4
  for k = 3, 2 + 2 * jobs, 2 do
    local op, m = ARGV[a], tonumber(ARGV[a + 2])
    local kind = redis.call('TYPE', KEYS[k + 1])['ok']
    if kind ~= 'none' and kind ~= kinds[op] then
      return {'taken', tostring((k - 1) / 2)}
    end
    a = a + 4 + m + 2 * tonumber(ARGV[a + 3 + m])
  end
end
local limit = tonumber(ARGV[3])
if limit > 0 then
  -- Counted before anything is written. A stream holds the jobs waiting and those being
  -- run (entries go when done); a Celery list, the jobs waiting.
  local held, a = {}, 4
  for k = 3, 2 + 2 * jobs, 2 do
    local op, m = ARGV[a], tonumber(ARGV[a + 2])
    -- Jobs of one queue share its first key, whatever their priority.
    local queue = ARGV[a + 3]
    if op ~= 'delay' and redis.call('EXISTS', KEYS[k]) == 0 then
      if held[queue] == nil then
        held[queue] = 0
        for i = a + 3, a + 2 + m do
          held[queue] = held[queue] + redis.call(op == 'lpush' and 'LLEN' or 'XLEN', ARGV[i])
        end
      end
      if held[queue] >= limit then
        return {'full', tostring((k - 1) / 2), tostring(held[queue])}
      end
      held[queue] = held[queue] + 1
    end
    a = a + 4 + m + 2 * tonumber(ARGV[a + 3 + m])
  end
end
local a = 4
local created = {}
for k = 3, 2 + 2 * jobs, 2 do
  local op, value, m = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local n = tonumber(ARGV[a + 3 + m])
  local first = a + 4 + m  -- the first field's name
  if redis.call('EXISTS', KEYS[k]) == 0 then
    local fields, named = {}, {}
    for i = first, first - 1 + 2 * n, 2 do
      fields[#fields + 1] = ARGV[i]
      fields[#fields + 1] = ARGV[i + 1]
      named[ARGV[i]] = ARGV[i + 1]
    end
    redis.call('HINCRBY', stats, 'submitted\t' .. named.engine .. '\t' .. named.task, 1)
    for _, old in ipairs(redis.call('ZRANDMEMBER', index, INDEX_SAMPLE)) do
      if redis.call('EXISTS', prefix .. old) == 0 then redis.call('ZREM', index, old) end
    end
    redis.call('HSET', KEYS[k], unpack(fields))
    local id = string.sub(KEYS[k], #prefix + 1)
    redis.call('ZADD', index, 0, id)
    created[#created + 1] = id
    if op == 'xadd' then
      redis.call('XADD', KEYS[k + 1], '*', 'id', value)
    elseif op == 'xadd-job' then
      local entry = {'id', value}
      for i = 1, #fields, 2 do
        if launch_fields[fields[i]] then
          entry[#entry + 1] = fields[i]
          entry[#entry + 1] = fields[i + 1]
        end
      end
      redis.call('XADD', KEYS[k + 1], '*', unpack(entry))
    elseif op == 'delay' then
      redis.call('ZADD', KEYS[k + 1], tonumber(value), id)
    else
      redis.call('LPUSH', KEYS[k + 1], value)
    end
  end
  a = first + 2 * n
end
if #created > 0 then
  redis.call('PUBLISH', announce, cjson.encode({state = 'queued', ids = created}))
end
if once then
  redis.call('SET', once, ARGV[tail] .. ' ' .. ARGV[tail + 1], 'EX', tonumber(ARGV[tail + 2]))
end
return {'created'}
