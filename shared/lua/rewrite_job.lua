#!lua
-- Take one learner's events out of a queued fan-out job (``examhook erase``): atomically,
-- unless the job started or changed since it was read, take it out of the queue and put the
-- rewritten job (if any events are left) in its place, due at the same time.
--
-- KEYS[1]  queue        P:queue (arq's queue)
-- KEYS[2]  job          arq:job:<job id>
-- KEYS[3]  in_progress  arq:in-progress:<job id>
-- KEYS[4]  job_retry    arq:retry:<job id>
-- KEYS[5]  new_job      arq:job:<new job id> (never written when no event is left)
-- ARGV[1]  job_id
-- ARGV[2]  job_as_read  the job as it was read (unchanged since, or nothing is done)
-- ARGV[3]  new_job_id   '' when no event is left
-- ARGV[4]  new_job      the rewritten job, as arq stores it
-- ARGV[5]  ttl_ms       the new job's retention
-- Returns 1 when the job was rewritten (or removed), 0 when it started or changed meanwhile.
local queue, job_key, in_progress, job_retry, new_job_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local job_id, job_as_read, new_job_id, new_job, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', in_progress) == 1 or redis.call('GET', job_key) ~= job_as_read then return 0 end
local due = redis.call('ZSCORE', queue, job_id)
if not due then return 0 end
redis.call('ZREM', queue, job_id)
redis.call('DEL', job_key, job_retry)
if new_job_id ~= '' then
  redis.call('SET', new_job_key, new_job, 'PX', ttl)
  redis.call('ZADD', queue, due, new_job_id)
end
return 1
