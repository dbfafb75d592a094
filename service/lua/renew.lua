-- Renew a consumer's leases: reset the idle time of the entries it still holds. An entry
-- another consumer took over while this one was silent (its loop stalled past the lease,
-- Redis away) stays theirs: XCLAIM alone would take it back, and the two attempts would
-- share one entry, the first to finish deleting it under the other.
-- KEYS[1]  the stream     ARGV[1]  the consumer group     ARGV[2]  the consumer
-- ARGV[3..]  the entry ids it holds
-- Returns how many were renewed.
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    table.insert(claim, ARGV[i])
  end
end
if #claim == 5 then
  return 0
end
table.insert(claim, 'JUSTID')  -- renewing is not delivering: the count stays
redis.call(unpack(claim))
return #claim - 6
