-- Record the outcome of one delivery attempt, atomically with what follows from it.
--
-- ARGV: prefix, event_id, integration, token, now_ms, outcome, attempt_json, last_error,
--       ttl_ms, delivered_ttl_ms, failure_ttl_ms, [retry_job_id, retry_job_bytes, run_at_ms]
--   outcome: delivered | retry | failed
--   With retry_job_*: enqueue arq's retry job in the same step, so a crash can never
--   leave a pair that failed once with nothing scheduled to try it again.
-- Returns the pair's attempt count.
local p, e, i, token, now, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local ttl, delivered_ttl, failure_ttl = ARGV[9], ARGV[10], ARGV[11]
local suffix = e .. ':' .. i
local pair = p .. ':pair:' .. suffix
local attempts_key = p .. ':attempts:' .. suffix
redis.call('RPUSH', attempts_key, ARGV[7])
local n = redis.call('HINCRBY', pair, 'attempts', 1)
redis.call('HINCRBY', pair, 'total_attempts', 1)
redis.call('HSET', pair, 'inflight', '0', 'status', outcome, 'last_attempt_at', now, 'last_error', ARGV[8])
redis.call('HSETNX', pair, 'first_attempt_at', now)
if outcome == 'delivered' then
  redis.call('SET', p .. ':delivered:' .. suffix, now, 'PX', delivered_ttl)
  redis.call('ZREM', p .. ':failures', suffix)
  redis.call('PEXPIRE', pair, ttl)
  redis.call('PEXPIRE', attempts_key, ttl)
  redis.call('HINCRBY', p .. ':stats', 'delivered', 1)
elseif outcome == 'failed' then
  redis.call('ZADD', p .. ':failures', now, suffix)
  redis.call('ZREMRANGEBYSCORE', p .. ':failures', '-inf', tonumber(now) - tonumber(failure_ttl))
  -- keep the failure and its payload for inspection until retried, purged or expired
  redis.call('PEXPIRE', pair, failure_ttl)
  redis.call('PEXPIRE', attempts_key, failure_ttl)
  local event_key = p .. ':event:' .. e
  if redis.call('PTTL', event_key) < tonumber(failure_ttl) then redis.call('PEXPIRE', event_key, failure_ttl) end
  redis.call('HINCRBY', p .. ':stats', 'failed', 1)
else
  redis.call('PEXPIRE', pair, ttl)
  redis.call('PEXPIRE', attempts_key, ttl)
  redis.call('HINCRBY', p .. ':stats', 'retries', 1)
  if ARGV[12] then
    local job_id = ARGV[12]
    redis.call('SET', 'arq:job:' .. job_id, ARGV[13], 'NX', 'PX', ttl)
    redis.call('ZADD', p .. ':queue', 'NX', ARGV[14], job_id)
  end
end
if redis.call('GET', p .. ':lock:' .. suffix) == token then redis.call('DEL', p .. ':lock:' .. suffix) end
return n
