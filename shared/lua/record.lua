-- Record the outcome of one delivery attempt, atomically with what follows from it.
--
-- ARGV: prefix, event_id, integration, token, now_ms, outcome, attempt_json, last_error,
--       ttl_ms, delivered_ttl_ms, failure_ttl_ms, uncertain, retry_in_ms, retry_job_bytes
--   outcome: delivered | retry | failed
--   uncertain '1': the attempt may have reached the destination (it timed out), so the
--     next attempt is told "maybe sent before", as after a crash mid-send.
--   retry: everything the pair needs (body, newest-release marker, its job) is kept for
--     at least the wait plus the payload retention, so no retry outlives its data; with
--     retry_job_bytes (the fan-out job's first failure) arq's retry job is enqueued in the
--     same step, so a crash can never leave a pair with nothing scheduled to try again.
-- Returns the pair's attempt count. Idempotent per token (one token per attempt).
local p, e, i, token, now, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local ttl, delivered_ttl, failure_ttl = tonumber(ARGV[9]), ARGV[10], tonumber(ARGV[11])
local uncertain, retry_in, retry_job = ARGV[12], tonumber(ARGV[13]), ARGV[14]
local suffix = e .. ':' .. i
local pair = p .. ':pair:' .. suffix
local attempts_key = p .. ':attempts:' .. suffix
local event_key = p .. ':event:' .. e

local function extend(key, ms)
  local current = redis.call('PTTL', key)
  if current ~= -2 and current < ms then redis.call('PEXPIRE', key, ms) end
end

-- the same command again (redis-py re-sends it when the connection dropped before the
-- reply, possibly much later, after other attempts): this attempt is recorded already, and
-- must not count twice. One small field per attempt, gone with the pair.
if token ~= '' and redis.call('HSETNX', pair, 'r:' .. token, '1') == 0 then
  return tonumber(redis.call('HGET', pair, 'attempts'))
end

redis.call('RPUSH', attempts_key, ARGV[7])
local n = redis.call('HINCRBY', pair, 'attempts', 1)
redis.call('HINCRBY', pair, 'total_attempts', 1)
redis.call('HSET', pair, 'inflight', uncertain, 'status', outcome, 'last_attempt_at', now,
           'last_error', ARGV[8])
redis.call('HSETNX', pair, 'first_attempt_at', now)
if outcome == 'delivered' then
  redis.call('SET', p .. ':delivered:' .. suffix, now, 'PX', delivered_ttl)
  redis.call('ZREM', p .. ':failures', suffix)
  redis.call('PEXPIRE', pair, ttl)
  redis.call('PEXPIRE', attempts_key, ttl)
  redis.call('HINCRBY', p .. ':stats', 'delivered', 1)
elseif outcome == 'failed' then
  redis.call('ZADD', p .. ':failures', now, suffix)
  redis.call('ZREMRANGEBYSCORE', p .. ':failures', '-inf', tonumber(now) - failure_ttl)
  -- keep the failure and its payload for inspection until retried, purged or expired
  redis.call('PEXPIRE', pair, failure_ttl)
  redis.call('PEXPIRE', attempts_key, failure_ttl)
  extend(event_key, failure_ttl)
  redis.call('HINCRBY', p .. ':stats', 'failed', 1)
else
  local keep = retry_in + ttl
  extend(pair, keep)
  extend(attempts_key, keep)
  extend(event_key, keep)
  local attempt_id = redis.call('HGET', pair, 'attempt_id')
  if attempt_id then extend(p .. ':latest:' .. attempt_id, keep) end
  redis.call('HINCRBY', p .. ':stats', 'retries', 1)
  local job_id = p .. ':' .. suffix
  if retry_job ~= '' then
    redis.call('SET', 'arq:job:' .. job_id, retry_job, 'NX', 'PX', keep)
    redis.call('ZADD', p .. ':queue', 'NX', tonumber(now) + retry_in, job_id)
  else
    extend('arq:job:' .. job_id, keep)  -- the running retry job, put back by arq's Retry
  end
end
if redis.call('GET', p .. ':lock:' .. suffix) == token then redis.call('DEL', p .. ':lock:' .. suffix) end
return n
