#!lua
-- Queue failed pairs again (``examhook failures retry``): a fresh round of attempts.
--
-- KEYS[1]  failures      P:failures
-- KEYS[2]  queue         P:queue (arq's queue)
-- then five keys per pair, in ARGV's order:
--   delivered    P:delivered:E:I
--   pair         P:pair:E:I
--   event        P:event:E
--   in_progress  arq:in-progress:<job id>
--   job          arq:job:<job id>
-- ARGV[1]  now_ms
-- ARGV[2]  ttl_ms        the job's and the body's retention from now
-- then three values per pair:
--   member      E:I, the pair in P:failures
--   job_id      the pair's deliver job id
--   job         the job, as arq stores it
-- Returns {queued, skipped}. Skipped, and left as they are: pairs no longer failed, whose
-- payload is gone, or whose job is running right now (try again in a moment). A pair
-- delivered meanwhile only loses its stale failure entry.
--
-- A shebang without allow-oom: a full Redis refuses the script whole, before any write.
local failures, queue = KEYS[1], KEYS[2]
local now, ttl = ARGV[1], tonumber(ARGV[2])
local queued, skipped = 0, 0
local pairs_given = (#ARGV - 2) / 3
for n = 0, pairs_given - 1 do
  local delivered, pair, event_key, in_progress, job_key =
    KEYS[3 + n * 5], KEYS[4 + n * 5], KEYS[5 + n * 5], KEYS[6 + n * 5], KEYS[7 + n * 5]
  local member, job_id, job = ARGV[3 + n * 3], ARGV[4 + n * 3], ARGV[5 + n * 3]
  if redis.call('EXISTS', delivered) == 1 then
    redis.call('ZREM', failures, member)
    skipped = skipped + 1
  elseif not redis.call('ZSCORE', failures, member)
      or redis.call('EXISTS', event_key) == 0
      or redis.call('EXISTS', in_progress) == 1 then
    skipped = skipped + 1
  else
    redis.call('ZREM', failures, member)
    redis.call('HSET', pair, 'attempts', '0', 'status', 'queued', 'last_error', '')
    redis.call('HINCRBY', pair, 'rounds', 1)
    redis.call('SET', job_key, job, 'PX', ttl)
    redis.call('ZADD', queue, now, job_id)
    -- only ever lengthen: other integrations' failures may keep this body longer
    if redis.call('PTTL', event_key) < ttl then redis.call('PEXPIRE', event_key, ttl) end
    queued = queued + 1
  end
end
return {queued, skipped}
