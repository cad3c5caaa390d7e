#!lua
-- Note an event that matched no integration's filter (listed by ``examhook report`` and
-- delivered later by ``examhook replay`` once an integration takes it).
--
-- KEYS[1]  unmatched  P:unmatched, event ids by time (ms)
-- KEYS[2]  stats      P:stats
--
-- ARGV[1]  now_ms
-- ARGV[2]  event_id
-- ARGV[3]  oldest_ms  entries older than this are dropped (payload retention)
-- Returns 1 if the event was noted now, 0 if it was already.
local unmatched_key, stats_key = KEYS[1], KEYS[2]
local now, event_id, oldest = ARGV[1], ARGV[2], ARGV[3]
local added = redis.call('ZADD', unmatched_key, 'NX', now, event_id)
redis.call('ZREMRANGEBYSCORE', unmatched_key, '-inf', oldest)
if added == 1 then redis.call('HINCRBY', stats_key, 'unmatched', 1) end
return added
