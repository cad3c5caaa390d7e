#!lua flags=allow-oom
-- Record the outcome of one delivery attempt, atomically with what follows from it.
--
-- allow-oom: the send has happened; its record must land even when Redis is full (it
-- frees more than it takes: the lock goes, retention shortens). Were it refused, the pair
-- would look unfinished and be sent again. Redis still refuses it whole when it cannot
-- write at all (a replica, MISCONF, NOREPLICAS): the worker then keeps the outcome and
-- writes it later (worker/outcomes.py).
--
-- KEYS[1]  pair       P:pair:E:I
-- KEYS[2]  attempts   P:attempts:E:I, one JSON record per attempt
-- KEYS[3]  body       P:event:E
-- KEYS[4]  failures   P:failures
-- KEYS[5]  stats      P:stats
-- KEYS[6]  lock       P:lock:E:I
-- KEYS[7]  delivered  P:delivered:E:I
-- KEYS[8]  queue      P:queue
-- KEYS[9]  retry_job  arq:job:<retry job id>
--
-- ARGV[1]  member          E:I, the pair in P:failures
-- ARGV[2]  token           the attempt's claim token
-- ARGV[3]  now_ms
-- ARGV[4]  outcome         delivered | retry | failed
-- ARGV[5]  attempt_json
-- ARGV[6]  last_error
-- ARGV[7]  ttl_ms          the pair record's retention
-- ARGV[8]  delivered_ttl_ms
-- ARGV[9]  failure_ttl_ms
-- ARGV[10] maybe_sent      '1': the attempt may have reached the destination (its outcome is
--                          unknown), so the next attempt is told so, as after a crash mid-send
-- ARGV[11] retry_in_ms
-- ARGV[12] retry_job       '' or the retry job's bytes (a fan-out job's pair: arq's retry job
--                          is enqueued in the same step, so a crash can never leave a pair
--                          with nothing scheduled to try again)
-- ARGV[13] retry_job_id    P:E:I
-- ARGV[14] releases_prefix 'P:releases:'
-- ARGV[15] unknown         '1': the outcome was unknown (counted in P:stats)
--
-- On retry, everything the pair needs (body, the attempt's releases, its job) is kept for at
-- least the wait plus the payload retention, so no retry outlives its data.
-- Returns the pair's attempt count. Idempotent per token (one token per attempt).
local pair_key, attempts_key, body_key, failures_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local stats_key, lock_key, delivered_key, queue_key, retry_job_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local member, token, now, outcome = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local attempt_json, last_error = ARGV[5], ARGV[6]
local ttl, delivered_ttl, failure_ttl = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local maybe_sent, retry_in, retry_job, retry_job_id = ARGV[10], tonumber(ARGV[11]), ARGV[12], ARGV[13]
local releases_prefix, unknown = ARGV[14], ARGV[15]

local function extend(key, ms)
  local current = redis.call('PTTL', key)
  if current ~= -2 and current < ms then redis.call('PEXPIRE', key, ms) end
end

-- the same command again (redis-py re-sends it when the connection dropped before the
-- reply, possibly much later, after other attempts; or the worker's journal wrote it while
-- the reply was lost): this attempt is recorded already, and must not count twice.
if token ~= '' and redis.call('HSETNX', pair_key, 'r:' .. token, '1') == 0 then
  return tonumber(redis.call('HGET', pair_key, 'attempts'))
end

redis.call('RPUSH', attempts_key, attempt_json)
local attempt_number = redis.call('HINCRBY', pair_key, 'attempts', 1)
redis.call('HINCRBY', pair_key, 'total_attempts', 1)
redis.call('HSET', pair_key, 'inflight', '0', 'maybe_sent', maybe_sent, 'status', outcome,
           'last_attempt_at', now, 'last_error', last_error)
redis.call('HDEL', pair_key, 'handed', 'recover_at')
redis.call('HSETNX', pair_key, 'first_attempt_at', now)
if unknown == '1' then
  redis.call('HINCRBY', pair_key, 'unknown_outcomes', 1)
  redis.call('HINCRBY', stats_key, 'unknown_outcomes', 1)
end
if outcome == 'delivered' then
  redis.call('SET', delivered_key, now, 'PX', delivered_ttl)
  redis.call('ZREM', failures_key, member)
  redis.call('PEXPIRE', pair_key, ttl)
  redis.call('PEXPIRE', attempts_key, ttl)
  redis.call('HINCRBY', stats_key, 'delivered', 1)
elseif outcome == 'failed' then
  redis.call('ZADD', failures_key, now, member)
  redis.call('ZREMRANGEBYSCORE', failures_key, '-inf', now - failure_ttl)
  -- keep the failure and its payload for inspection until retried, purged or expired
  redis.call('PEXPIRE', pair_key, failure_ttl)
  redis.call('PEXPIRE', attempts_key, failure_ttl)
  extend(body_key, failure_ttl)
  redis.call('HINCRBY', stats_key, 'failed', 1)
else
  local keep = retry_in + ttl
  extend(pair_key, keep)
  extend(attempts_key, keep)
  extend(body_key, keep)
  local attempt_id = redis.call('HGET', pair_key, 'attempt_id')
  if attempt_id then extend(releases_prefix .. attempt_id, keep) end
  redis.call('HINCRBY', stats_key, 'retries', 1)
  if retry_job ~= '' then
    redis.call('SET', retry_job_key, retry_job, 'NX', 'PX', keep)
    redis.call('ZADD', queue_key, 'NX', now + retry_in, retry_job_id)
  else
    extend(retry_job_key, keep)  -- the running retry job, put back by arq's Retry
  end
end
if redis.call('GET', lock_key) == token then redis.call('DEL', lock_key) end
return attempt_number
