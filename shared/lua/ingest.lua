#!lua
-- Accept a batch of events, all or nothing: dedup, store the bodies, index them by exam,
-- queue arq's fan-out jobs, and only then mark the events seen.
--
-- One call serves every request that arrived while the previous call was in flight (group
-- commit); each request still gets its own answer from the returned array.
--
-- Why nothing can be half-accepted (Redis runs a script without rollback):
-- * the shebang (without allow-oom) makes Redis refuse the whole script when it is out of
--   memory, or cannot write at all, before any command runs;
-- * every key written is declared in KEYS, so an ACL user that may not write one of them is
--   refused before anything runs (job ids are made here, so KEYS[4], a key in arq's job key
--   space that is never written, stands for them);
-- * against any other error part-way, the dedup records come last: an event is "seen" only
--   once its body and its job are written, so the sender's retry is accepted again.
--
-- KEYS[1]  queue          P:queue, arq's queue (zset of job ids by run time, ms)
-- KEYS[2]  stats          P:stats
-- KEYS[3]  exams          P:exams, exam ids by their newest event (ms)
-- KEYS[4]  job_key_space  arq:job:P:b-acl-check, never written (see above)
-- then four keys per event, in the order of the events in ARGV:
--   seen         P:seen:E      dedup record
--   body         P:event:E     the body as received
--   releases     P:releases:A  the attempt's releases: event ids by releasedAt (ms)
--   exam_events  P:exam:X      the exam's event ids by arrival (ms)
--
-- ARGV[1]  now_ms
-- ARGV[2]  dedup_ttl_ms
-- ARGV[3]  payload_ttl_ms      bodies and the exam index
-- ARGV[4]  releases_ttl_ms     outlives any older release's records
-- ARGV[5]  max_events_per_job  at most 15 (a msgpack fixarray header)
-- ARGV[6]  job_head            a handle_events job cut where its event list goes
-- ARGV[7]  job_tail              (shared/contract.py, fanout_job_template)
-- ARGV[8]  job_key_prefix      'arq:job:'
-- ARGV[9]  job_id_prefix       'P:b'; job ids are P:b<count>-<job_token>-<n>
-- ARGV[10] job_token           unique per call: job ids of every receiver never meet
-- then five values per event:
--   event_id, released_ms, body, job_entry (its msgpack [E, attempt_id, released_ms]), exam_id
--
-- Returns one integer per event: 1 accepted, 0 duplicate (seen within the dedup window,
-- or earlier in this same batch).
local queue_key, stats_key, exams_key = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local dedup_ttl, payload_ttl, releases_ttl = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local max_per_job, job_head, job_tail = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local job_key_prefix, job_id_prefix, job_token = ARGV[8], ARGV[9], ARGV[10]

local FIRST_EVENT_KEY, KEYS_PER_EVENT = 5, 4
local FIRST_EVENT_ARG, ARGS_PER_EVENT = 11, 5

-- 1. which events are new; nothing is written yet
local answers, accepted, taken = {}, {}, {}
local event_count = (#ARGV - FIRST_EVENT_ARG + 1) / ARGS_PER_EVENT
for index = 0, event_count - 1 do
  local key = FIRST_EVENT_KEY + index * KEYS_PER_EVENT
  local arg = FIRST_EVENT_ARG + index * ARGS_PER_EVENT
  local event_id = ARGV[arg]
  if taken[event_id] or redis.call('EXISTS', KEYS[key]) == 1 then
    answers[#answers + 1] = 0
  else
    taken[event_id] = true
    answers[#answers + 1] = 1
    accepted[#accepted + 1] = {key, arg}
  end
end
if #accepted == 0 then
  redis.call('HINCRBY', stats_key, 'duplicate', #answers)
  return answers
end

-- 2. bodies, the attempts' releases, the exam index
local exams, exam_ids = {}, {}
for _, event in ipairs(accepted) do
  local key, arg = event[1], event[2]
  local body_key, releases_key, exam_events_key = KEYS[key + 1], KEYS[key + 2], KEYS[key + 3]
  local event_id, released, body, exam_id = ARGV[arg], ARGV[arg + 1], ARGV[arg + 2], ARGV[arg + 4]
  redis.call('SET', body_key, body, 'PX', payload_ttl)
  -- every release of the attempt: an older one still queued is then never delivered (the
  -- newest wins), and a re-release's email can say what it replaces
  redis.call('ZADD', releases_key, released, event_id)
  redis.call('PEXPIRE', releases_key, releases_ttl)
  redis.call('ZADD', exam_events_key, now, event_id)
  if not exam_ids[exam_events_key] then
    exam_ids[exam_events_key] = exam_id
    exams[#exams + 1] = exam_events_key
  end
end
for _, exam_events_key in ipairs(exams) do
  redis.call('PEXPIRE', exam_events_key, payload_ttl)
  redis.call('ZREMRANGEBYSCORE', exam_events_key, '-inf', now - payload_ttl)
  redis.call('ZADD', exams_key, now, exam_ids[exam_events_key])
end
redis.call('PEXPIRE', exams_key, payload_ttl)
redis.call('ZREMRANGEBYSCORE', exams_key, '-inf', now - payload_ttl)

-- 3. arq's jobs: handle_events jobs of at most max_per_job events each
local entries, jobs = {}, 0
local function enqueue()
  jobs = jobs + 1
  local job_id = job_id_prefix .. #entries .. '-' .. job_token .. '-' .. jobs
  local job = job_head .. string.char(0x90 + #entries) .. table.concat(entries) .. job_tail
  redis.call('SET', job_key_prefix .. job_id, job, 'PX', payload_ttl)
  redis.call('ZADD', queue_key, now, job_id)
  entries = {}
end
for _, event in ipairs(accepted) do
  entries[#entries + 1] = ARGV[event[2] + 3]
  if #entries == max_per_job then enqueue() end
end
if #entries > 0 then enqueue() end

-- 4. last: the dedup records, so that a failure above never turns a retry into a duplicate
for _, event in ipairs(accepted) do
  redis.call('SET', KEYS[event[1]], now, 'PX', dedup_ttl)
end
redis.call('HINCRBY', stats_key, 'accepted', #accepted)
if #answers > #accepted then redis.call('HINCRBY', stats_key, 'duplicate', #answers - #accepted) end
return answers
