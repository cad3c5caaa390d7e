#!lua
-- Claim (event, integration) pairs of one event before a delivery attempt, in one round trip.
-- The shebang (without allow-oom): when Redis cannot take writes, the claim is refused whole.
--
-- KEYS[1]  body       P:event:E
-- KEYS[2]  stats      P:stats
-- KEYS[3]  failures   P:failures
-- KEYS[4]  seen       P:seen:E (holds when the event was accepted, ms)
-- then three keys per integration, in the order of the names in ARGV:
--   pair       P:pair:E:I       delivery state
--   lock       P:lock:E:I       held while one worker sends the pair
--   delivered  P:delivered:E:I  set once the pair succeeded: never send again
--
-- ARGV[1]  event_id
-- ARGV[2]  attempt_id     '' in mode retry: read from each pair's record
-- ARGV[3]  released_ms    likewise
-- ARGV[4]  token          this claim's own (one per attempt)
-- ARGV[5]  lock_ttl_ms
-- ARGV[6]  now_ms
-- ARGV[7]  ttl_ms         the pair record's retention
-- ARGV[8]  mode           'first': a fan-out job; a pair attempted already is left to its own
--                         retry job. 'retry': that retry job (or a failure queued again).
-- ARGV[9]  with_body      '1': also return the body (false when it expired)
-- ARGV[10] releases_prefix  'P:releases:' (an attempt's releases: P:releases:A)
-- ARGV[11] recovery_grace_ms
-- ARGV[12...] one integration name per pair
--
-- Returns {body, received_ms, {state, attempts_so_far, interrupted, handed_over, wait_ms}, ...},
-- one entry per name (received_ms is 0 once the dedup record expired). States: ok; delivered (never send again); superseded (a newer release exists);
-- purged (an operator purged the failure this retry job belonged to); scheduled (mode first,
-- attempted already); expired (the body is gone); locked (another worker is sending it);
-- recovering (a previous attempt never recorded its outcome: its worker may still be alive
-- and about to record it, so nobody sends before wait_ms have passed).
-- interrupted '1': a previous attempt may have reached the destination (it never recorded an
-- outcome, or its outcome was unknown). handed_over '1': a previous attempt that never
-- recorded an outcome had already handed its message over (see Store.mark_handed_over).
local body_key, stats_key, failures_key, seen_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local event_id, given_attempt, given_released = ARGV[1], ARGV[2], ARGV[3]
local token, lock_ttl, now, ttl = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local mode, with_body, releases_prefix = ARGV[8], ARGV[9], ARGV[10]
local recovery_grace = tonumber(ARGV[11])
local FIRST_NAME, FIRST_PAIR_KEY, KEYS_PER_PAIR = 12, 5, 3

local body = redis.call('GET', body_key)
local out = {(with_body == '1') and body or false, tonumber(redis.call('GET', seen_key) or '0')}
for n = FIRST_NAME, #ARGV do
  local integration = ARGV[n]
  local key = FIRST_PAIR_KEY + (n - FIRST_NAME) * KEYS_PER_PAIR
  local pair_key, lock_key, delivered_key = KEYS[key], KEYS[key + 1], KEYS[key + 2]
  local member = event_id .. ':' .. integration
  local attempt_id, released = given_attempt, given_released
  local purged = false
  if mode == 'retry' then
    local stored = redis.call('HMGET', pair_key, 'attempt_id', 'released_ms')
    -- a retry job whose pair record is gone: the failure was purged
    purged = not stored[1]
    attempt_id, released = stored[1] or '', stored[2] or '0'
  end
  local fields = redis.call('HMGET', pair_key, 'attempts', 'inflight', 'maybe_sent', 'handed', 'recover_at')
  local attempts, inflight, maybe_sent = fields[1] or '0', fields[2], fields[3]
  local handed, recover_at = fields[4], tonumber(fields[5] or '0')
  local newest = redis.call('ZRANGE', releases_prefix .. attempt_id, 0, 0, 'REV', 'WITHSCORES')
  local latest = tonumber(newest[2] or '0')
  local lock_holder = redis.call('GET', lock_key)
  local state, wait = nil, 0
  if redis.call('EXISTS', delivered_key) == 1 then
    state = 'delivered'
  elseif purged then
    state = 'purged'
  elseif mode == 'first' and tonumber(attempts) > 0 then
    state = 'scheduled'
  elseif latest > tonumber(released) then
    -- counted once, however often this runs (a job re-run, a command re-sent)
    if redis.call('HGET', pair_key, 'status') ~= 'superseded' then
      redis.call('HINCRBY', stats_key, 'superseded', 1)
    end
    redis.call('HSET', pair_key, 'status', 'superseded', 'last_attempt_at', now,
               'attempt_id', attempt_id, 'released_ms', released)
    redis.call('PEXPIRE', pair_key, ttl)
    redis.call('ZREM', failures_key, member)
    state = 'superseded'
  elseif not body then
    state = 'expired'
  elseif lock_holder == token then
    state = 'again'  -- this same claim, re-sent by redis-py after its reply was lost
  elseif lock_holder then
    state = 'locked'
  elseif inflight == '1' and (recover_at == 0 or now < recover_at) then
    if recover_at == 0 then
      recover_at = now + recovery_grace
      redis.call('HSET', pair_key, 'recover_at', recover_at)
    end
    state, wait = 'recovering', recover_at - now
  else
    state = 'ok'
  end
  if state == 'again' then
    out[#out + 1] = {'ok', attempts, redis.call('HGET', pair_key, 'claim_interrupted') or '0',
                     redis.call('HGET', pair_key, 'claim_handed') or '0', 0}
  elseif state == 'ok' then
    redis.call('SET', lock_key, token, 'PX', lock_ttl)
    local interrupted = (inflight == '1' or maybe_sent == '1') and '1' or '0'
    local handed_over = (inflight == '1' and handed) and '1' or '0'
    redis.call('HSET', pair_key, 'inflight', '1', 'status', 'sending', 'attempt_id', attempt_id,
               'released_ms', released, 'claim_interrupted', interrupted, 'claim_handed', handed_over)
    redis.call('HDEL', pair_key, 'recover_at', 'handed')
    redis.call('HSETNX', pair_key, 'first_attempt_at', now)
    if redis.call('PTTL', pair_key) < ttl then redis.call('PEXPIRE', pair_key, ttl) end
    out[#out + 1] = {'ok', attempts, interrupted, handed_over, 0}
  else
    out[#out + 1] = {state, attempts, '0', '0', wait}
  end
end
return out
