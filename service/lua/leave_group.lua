-- Remove a stopping consumer from its group on each stream, where it holds nothing.
-- KEYS     the streams     ARGV[1]  the group     ARGV[2]  the consumer
-- A consumer's name is new for every process: without this, each start of a worker or
-- gateway leaves one more entry in every group it read, for good. One still holding an
-- entry (a job cut short by the stop) stays: deleting it would drop that entry from the
-- group's pending list, and the job would never be delivered again.
for _, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 1 then
    local ok, pending = pcall(redis.call, 'XPENDING', stream, ARGV[1], '-', '+', 1, ARGV[2])
    if ok and #pending == 0 then
      redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[1], ARGV[2])
    end
  end
end
return 0
