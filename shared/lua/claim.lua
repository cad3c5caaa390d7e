-- Claim one (event, integration) pair before a delivery attempt.
--
-- ARGV: prefix, event_id, integration, attempt_id, released_ms, token, lock_ttl_ms,
--       now_ms, ttl_ms, mode
--   attempt_id/released_ms may be '' : then they are read from the pair's record.
--   mode 'first': called by the fan-out job; a pair already attempted is left to its
--                 own retry job.  mode 'retry': called by that retry job; returns the body.
-- Returns {state, attempts_so_far, interrupted, body}; state is one of
--   ok, delivered (never send again), superseded (a newer release exists),
--   locked (another worker is sending it), scheduled (mode first, already attempted),
--   expired (the body is gone).
local p, e, i = ARGV[1], ARGV[2], ARGV[3]
local attempt_id, released, token = ARGV[4], ARGV[5], ARGV[6]
local lock_ttl, now, ttl, mode = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local suffix = e .. ':' .. i
local pair = p .. ':pair:' .. suffix
if redis.call('EXISTS', p .. ':delivered:' .. suffix) == 1 then return {'delivered'} end
if attempt_id == '' then
  local stored = redis.call('HMGET', pair, 'attempt_id', 'released_ms')
  attempt_id, released = stored[1] or '', stored[2] or '0'
end
local attempts = redis.call('HGET', pair, 'attempts') or '0'
if mode == 'first' and tonumber(attempts) > 0 then return {'scheduled'} end
local latest = tonumber(redis.call('GET', p .. ':latest:' .. attempt_id) or '0')
if latest > tonumber(released) then
  redis.call('HSET', pair, 'status', 'superseded', 'last_attempt_at', now)
  redis.call('PEXPIRE', pair, ttl)
  redis.call('ZREM', p .. ':failures', suffix)
  redis.call('HINCRBY', p .. ':stats', 'superseded', 1)
  return {'superseded'}
end
local body = false
if mode == 'retry' then
  body = redis.call('GET', p .. ':event:' .. e)
  if not body then return {'expired'} end
end
if not redis.call('SET', p .. ':lock:' .. suffix, token, 'NX', 'PX', lock_ttl) then return {'locked'} end
-- 'inflight' still set means the previous attempt started and never recorded an outcome
local interrupted = redis.call('HGET', pair, 'inflight') or '0'
redis.call('HSET', pair, 'inflight', '1', 'status', 'sending', 'attempt_id', attempt_id, 'released_ms', released)
redis.call('HSETNX', pair, 'first_attempt_at', now)
if redis.call('PTTL', pair) < tonumber(ttl) then redis.call('PEXPIRE', pair, ttl) end
return {'ok', attempts, interrupted, body}
