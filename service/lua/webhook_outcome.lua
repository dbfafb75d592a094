-- Record what became of one try of a webhook delivery, counting it once however often the
-- call is sent (the client sends it again when the answer is lost with the connection).
-- KEYS[1]  the deliveries stream     KEYS[2]  the webhook counters
-- KEYS[3]  this try's own marker key (a new name for every try)
-- ARGV[1]  the senders' group        ARGV[2]  the delivery's entry id
-- ARGV[3]  "failed" (this try failed; the delivery stays owed), or the delivery is owed no
--          more: "delivered", "dropped" (its last try failed), "" (nothing was owed)
-- A finished delivery is acknowledged and deleted, and counted only by the call that
-- acknowledged it; a failed try is counted by the call that set its marker.
if ARGV[3] == 'failed' then
  if redis.call('SET', KEYS[3], '1', 'NX', 'EX', 3600) then
    redis.call('HINCRBY', KEYS[2], 'failed', 1)
  end
  return 0
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if acked == 1 and ARGV[3] ~= '' then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
end
return acked
