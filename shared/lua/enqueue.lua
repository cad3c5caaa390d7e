#!lua
-- Queue arq jobs, each unless a job of that id exists already.
--
-- KEYS[1]  queue  P:queue
-- then one key per job: arq:job:<job id>
--
-- ARGV[1]  ttl_ms  the job's retention (a job outliving its event's body would find nothing)
-- then three values per job: job_bytes, run_at_ms, job_id
-- Returns how many jobs were queued.
local queue_key = KEYS[1]
local ttl = ARGV[1]
local FIRST_JOB_ARG, ARGS_PER_JOB = 2, 3
local queued = 0
for n = 0, (#ARGV - FIRST_JOB_ARG + 1) / ARGS_PER_JOB - 1 do
  local arg = FIRST_JOB_ARG + n * ARGS_PER_JOB
  local job, run_at, job_id = ARGV[arg], ARGV[arg + 1], ARGV[arg + 2]
  if redis.call('SET', KEYS[2 + n], job, 'NX', 'PX', ttl) then
    redis.call('ZADD', queue_key, 'NX', run_at, job_id)
    queued = queued + 1
  end
end
return queued
