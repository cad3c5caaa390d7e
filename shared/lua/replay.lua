#!lua
-- Send pairs again on purpose (``examhook replay``): a fresh round of attempts for each
-- (event, integration) pair, bypassing "never deliver twice" deliberately. Each pair is
-- decided and queued atomically here, so a pair that is being sent or waiting for a retry
-- right now is left to that round (and counted as skipped), never sent twice at once.
--
-- A fresh round: the delivered marker and the failure entry go, attempts start again at 0,
-- the status is 'queued', attempt_id/released_ms are set from the event (the retry job's
-- claim reads them from here), the attempt log is kept, 'replays' counts the rounds; then a
-- ``deliver(E, I)`` job (id P:E:I) is queued, due now. The event leaves P:unmatched.
--
-- KEYS[1]  queue      P:queue
-- KEYS[2]  failures   P:failures
-- KEYS[3]  unmatched  P:unmatched
-- KEYS[4]  stats      P:stats
-- then eight keys per pair, in the order of the pairs in ARGV:
--   body         P:event:E
--   pair         P:pair:E:I
--   attempts     P:attempts:E:I
--   delivered    P:delivered:E:I
--   lock         P:lock:E:I
--   releases     P:releases:A
--   job          arq:job:P:E:I
--   in_progress  arq:in-progress:P:E:I
--
-- ARGV[1]  now_ms
-- ARGV[2]  ttl_ms    the pair record's (and so the job's and the body's) retention
-- ARGV[3]  dry_run   '1': decide only, write nothing
-- then six values per pair: event_id, integration, attempt_id, released_ms, job_bytes, job_id (P:E:I)
--
-- Returns one answer per pair: 'queued' (or would be, in a dry run); skipped: 'pending'
-- (queued, being sent or waiting for a retry), 'locked' (a worker holds it), 'expired' (the
-- body is gone), 'superseded' (a newer release of the attempt exists).
local queue_key, failures_key, unmatched_key, stats_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, ttl, dry_run = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local FIRST_PAIR_KEY, KEYS_PER_PAIR = 5, 8
local FIRST_PAIR_ARG, ARGS_PER_PAIR = 4, 6
local PENDING = {queued = true, sending = true, retry = true}

local function lengthen(key)
  local current = redis.call('PTTL', key)
  if current ~= -2 and current < ttl then redis.call('PEXPIRE', key, ttl) end
end

local out = {}
for n = 0, (#ARGV - FIRST_PAIR_ARG + 1) / ARGS_PER_PAIR - 1 do
  local key = FIRST_PAIR_KEY + n * KEYS_PER_PAIR
  local arg = FIRST_PAIR_ARG + n * ARGS_PER_PAIR
  local body_key, pair_key, attempts_key, delivered_key = KEYS[key], KEYS[key + 1], KEYS[key + 2], KEYS[key + 3]
  local lock_key, releases_key, job_key, in_progress_key = KEYS[key + 4], KEYS[key + 5], KEYS[key + 6], KEYS[key + 7]
  local event_id, integration, attempt_id = ARGV[arg], ARGV[arg + 1], ARGV[arg + 2]
  local released, job, job_id = tonumber(ARGV[arg + 3]), ARGV[arg + 4], ARGV[arg + 5]
  local delivered = redis.call('EXISTS', delivered_key) == 1
  local status = redis.call('HGET', pair_key, 'status')
  local newest = redis.call('ZRANGE', releases_key, 0, 0, 'REV', 'WITHSCORES')
  local answer
  if redis.call('EXISTS', body_key) == 0 then
    answer = 'expired'
  elseif redis.call('EXISTS', lock_key) == 1 then
    answer = 'locked'
  elseif redis.call('EXISTS', in_progress_key) == 1 or redis.call('EXISTS', job_key) == 1
      or (not delivered and status and PENDING[status]) then
    answer = 'pending'
  elseif tonumber(newest[2] or '0') > released or (not delivered and status == 'superseded') then
    answer = 'superseded'
  else
    answer = 'queued'
  end
  if answer == 'queued' and dry_run ~= '1' then
    redis.call('DEL', delivered_key)
    redis.call('ZREM', failures_key, event_id .. ':' .. integration)
    redis.call('HSET', pair_key, 'status', 'queued', 'attempts', '0', 'last_error', '',
               'attempt_id', attempt_id, 'released_ms', released, 'inflight', '0', 'maybe_sent', '0',
               'replayed_at', now)
    redis.call('HDEL', pair_key, 'recover_at', 'handed', 'claim_interrupted', 'claim_handed')
    redis.call('HINCRBY', pair_key, 'replays', 1)
    lengthen(pair_key)
    lengthen(attempts_key)
    lengthen(body_key)
    lengthen(releases_key)
    redis.call('SET', job_key, job, 'PX', ttl)
    redis.call('ZADD', queue_key, now, job_id)
    redis.call('ZREM', unmatched_key, event_id)
    redis.call('HINCRBY', stats_key, 'replayed', 1)
  end
  out[#out + 1] = answer
end
return out
