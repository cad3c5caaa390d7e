#!lua flags=allow-oom
-- Give up a claim without recording an outcome: a shutdown mid-attempt, or no lane slot in
-- time. allow-oom: it only frees.
--
-- KEYS[1]  lock  P:lock:E:I
-- KEYS[2]  pair  P:pair:E:I
--
-- ARGV[1]  token
-- ARGV[2]  may_have_sent  '0': nothing was sent, so the pair is as if never claimed; '1': the
--                         send may have started (the next claim waits its recovery grace and
--                         is told "maybe sent before")
-- Returns 1 if the lock was this claim's, else 0 (it expired, or another claim holds it).
local lock_key, pair_key = KEYS[1], KEYS[2]
local token, may_have_sent = ARGV[1], ARGV[2]
if redis.call('GET', lock_key) ~= token then return 0 end
redis.call('DEL', lock_key)
if may_have_sent == '0' then
  redis.call('HSET', pair_key, 'inflight', '0', 'status', 'queued')
end
return 1
