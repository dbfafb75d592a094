-- A page of jobs, newest first, optionally only those with a given state, task, engine or
-- queue. Looks at no more than a budget of index entries per call, so that a filter that
-- matches few jobs never blocks Redis for long: a page may then hold fewer jobs than asked
-- for, and the caller follows the cursor.
-- KEYS[1]  the index of every job (a sorted set of job ids; ids sort by creation)
-- ARGV[1]  the prefix of job hashes
-- ARGV[2]  cursor: only jobs older than this id ("" for the newest)
-- ARGV[3]  at most this many jobs         ARGV[4]  at most this many index entries looked at
-- ARGV[5..8]  the state, task, engine and queue a job must have ("" for any)
-- Returns {next, n, field, value, ..., n, field, value, ...}: the cursor of the next page
-- ("" when there is none), then each record as its length and its fields and values.
-- Index entries of jobs whose record has expired are dropped on the way.
local index, prefix = KEYS[1], ARGV[1]
local limit, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local want = {ARGV[5], ARGV[6], ARGV[7], ARGV[8]}
local out = {''}
local found, seen = 0, 0
local upper = ARGV[2] == '' and '+' or '(' .. ARGV[2]
while found < limit and seen < budget do
  local ids = redis.call('ZREVRANGEBYLEX', index, upper, '-', 'LIMIT', 0,
                         math.min(100, budget - seen))
  if #ids == 0 then
    return out
  end
  for _, id in ipairs(ids) do
    seen = seen + 1
    upper = '(' .. id
    local got = redis.call('HMGET', prefix .. id, 'state', 'task', 'engine', 'queue')
    if not got[1] then
      redis.call('ZREM', index, id)
    else
      local match = true
      for i = 1, 4 do
        if want[i] ~= '' and got[i] ~= want[i] then match = false end
      end
      if match then
        local record = redis.call('HGETALL', prefix .. id)
        out[#out + 1] = #record
        for _, item in ipairs(record) do out[#out + 1] = item end
        found = found + 1
      end
    end
    if found >= limit or seen >= budget then break end
  end
end
if #redis.call('ZREVRANGEBYLEX', index, upper, '-', 'LIMIT', 0, 1) > 0 then
  out[1] = string.sub(upper, 2)
end
return out
