-- Claim (event, integration) pairs before a delivery attempt, in one round trip.
--
-- ARGV: prefix, event_id, attempt_id, released_ms, token, lock_ttl_ms, now_ms, ttl_ms,
--       mode, with_body, then one integration name per remaining argument.
--   attempt_id/released_ms may be '': then they are read from each pair's record.
--   mode 'first': called by the fan-out job; a pair already attempted is left to its
--                 own retry job.  mode 'retry': called by that retry job.
--   with_body '1': also return the body (false when it expired).
-- Returns {body, {state, attempts_so_far, interrupted}, ...} with one entry per name;
-- state is one of ok, delivered (never send again), superseded (a newer release exists),
-- purged (an operator purged the failure this retry job belonged to),
-- locked (another worker is sending it), scheduled (mode first, already attempted),
-- expired (the body is gone).
local p, e = ARGV[1], ARGV[2]
local given_attempt, given_released, token = ARGV[3], ARGV[4], ARGV[5]
local lock_ttl, now, ttl, mode, with_body = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local body = redis.call('GET', p .. ':event:' .. e)
local out = {(with_body == '1') and body or false}
for n = 11, #ARGV do
  local i = ARGV[n]
  local suffix = e .. ':' .. i
  local pair = p .. ':pair:' .. suffix
  local attempt_id, released = given_attempt, given_released
  local purged = false
  if attempt_id == '' then
    local stored = redis.call('HMGET', pair, 'attempt_id', 'released_ms')
    -- a retry job whose pair record is gone: the failure was purged
    purged = not stored[1]
    attempt_id, released = stored[1] or '', stored[2] or '0'
  end
  local attempts = redis.call('HGET', pair, 'attempts') or '0'
  local latest = tonumber(redis.call('GET', p .. ':latest:' .. attempt_id) or '0')
  local state
  if redis.call('EXISTS', p .. ':delivered:' .. suffix) == 1 then
    state = 'delivered'
  elseif purged then
    state = 'purged'
  elseif mode == 'first' and tonumber(attempts) > 0 then
    state = 'scheduled'
  elseif latest > tonumber(released) then
    -- counted once, however often this runs (a job re-run, a command re-sent)
    if redis.call('HGET', pair, 'status') ~= 'superseded' then
      redis.call('HINCRBY', p .. ':stats', 'superseded', 1)
    end
    redis.call('HSET', pair, 'status', 'superseded', 'last_attempt_at', now)
    redis.call('PEXPIRE', pair, ttl)
    redis.call('ZREM', p .. ':failures', suffix)
    state = 'superseded'
  elseif not body then
    state = 'expired'
  elseif redis.call('SET', p .. ':lock:' .. suffix, token, 'NX', 'PX', lock_ttl) then
    state = 'ok'
  elseif redis.call('GET', p .. ':lock:' .. suffix) == token then
    state = 'again'  -- this same claim, re-sent by redis-py after its reply was lost
  else
    state = 'locked'
  end
  if state == 'again' then
    out[#out + 1] = {'ok', attempts, redis.call('HGET', pair, 'claim_interrupted') or '0'}
  elseif state == 'ok' then
    -- 'inflight' still set means the previous attempt started and never recorded an outcome
    local interrupted = redis.call('HGET', pair, 'inflight') or '0'
    redis.call('HSET', pair, 'inflight', '1', 'status', 'sending', 'attempt_id', attempt_id,
               'released_ms', released, 'claim_interrupted', interrupted)
    redis.call('HSETNX', pair, 'first_attempt_at', now)
    if redis.call('PTTL', pair) < tonumber(ttl) then redis.call('PEXPIRE', pair, ttl) end
    out[#out + 1] = {'ok', attempts, interrupted}
  else
    out[#out + 1] = {state, attempts, '0'}
  end
end
return out
