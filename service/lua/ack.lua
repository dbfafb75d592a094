-- Acknowledge a stream entry and delete it, so finished work does not pile up; only by the
-- consumer that holds it. A consumer whose lease ran out (its loop stalled, Redis away) may
-- find the entry taken over by another, whose attempt is the one running now: that entry
-- is theirs to acknowledge, and deleting it would leave their attempt nothing to be
-- reclaimed by should they be lost too.
-- KEYS[1]  the stream     ARGV[1]  the consumer group     ARGV[2]  the entry id
-- ARGV[3]  the consumer acknowledging it
-- Returns 1 when the entry was deleted, 0 when it was not (gone already, or not ours).
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if pending[1] and pending[1][2] ~= ARGV[3] then
  return 0
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
