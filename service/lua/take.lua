-- Take up to ARGV[3] new entries for a consumer from the streams KEYS, in their order: a
-- later stream is read only while the earlier ones hold nothing new. KEYS list a worker's
-- streams from the highest priority to the lowest, so no lower-priority job is taken
-- while a higher one waits, and never more than the worker has room for.
-- ARGV[1]  the consumer group     ARGV[2]  the consumer     ARGV[3]  the most to take
-- Returns {{stream, {{entry id, {field, value, ...}}, ...}}, ...}, streams with none left out.
local left = tonumber(ARGV[3])
local taken = {}
for _, stream in ipairs(KEYS) do
  if left <= 0 then break end
  -- A stream no job has used yet may not exist; reading it would be an error.
  if redis.call('EXISTS', stream) == 1 then
    local read = {'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left, 'STREAMS', stream, '>'}
    local reply = redis.pcall(unpack(read))
    if type(reply) == 'table' and reply.err then
      -- The stream was made again without its group (Redis lost its data, and a job was
      -- queued since): make the group, from the stream's start, and read again. An error
      -- here would leave what was taken above with this consumer, unstarted.
      if not string.find(reply.err, 'NOGROUP', 1, true) then
        return redis.error_reply(reply.err)
      end
      redis.call('XGROUP', 'CREATE', stream, ARGV[1], '0')
      reply = redis.call(unpack(read))
    end
    if reply then
      local entries = reply[1][2]
      taken[#taken + 1] = {stream, entries}
      left = left - #entries
    end
  end
end
return taken
