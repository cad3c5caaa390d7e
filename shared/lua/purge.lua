#!lua flags=allow-oom
-- Forget failed pairs (``examhook failures purge``): the failure entry, state and attempt
-- log, and any job of the pair that is queued but not running.
--
-- KEYS[1]  failures      P:failures
-- KEYS[2]  queue         P:queue (arq's queue)
-- then five keys per pair, in ARGV's order:
--   pair         P:pair:E:I
--   attempts     P:attempts:E:I
--   in_progress  arq:in-progress:<job id>
--   job          arq:job:<job id>
--   job_retry    arq:retry:<job id>
-- then two values per pair in ARGV:
--   member      E:I, the pair in P:failures
--   job_id      the pair's deliver job id
-- Returns how many failures were removed. A pair that is no longer failed (delivered, or
-- queued again by a concurrent ``failures retry``) is left alone.
--
-- allow-oom: it only deletes; a full Redis must still let an operator make room.
local failures, queue = KEYS[1], KEYS[2]
local removed = 0
for n = 0, #ARGV / 2 - 1 do
  local pair, attempts, in_progress, job_key, job_retry =
    KEYS[3 + n * 5], KEYS[4 + n * 5], KEYS[5 + n * 5], KEYS[6 + n * 5], KEYS[7 + n * 5]
  local member, job_id = ARGV[1 + n * 2], ARGV[2 + n * 2]
  if redis.call('ZREM', failures, member) == 1 then
    if redis.call('EXISTS', in_progress) == 0 then
      redis.call('ZREM', queue, job_id)
      redis.call('DEL', job_key, job_retry)
    end
    redis.call('DEL', pair, attempts)
    removed = removed + 1
  end
end
return removed
