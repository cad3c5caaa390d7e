#!lua
-- Accept a batch of events, all or nothing: dedup, record the attempts' releases, index the
-- events by exam, queue arq's fan-out jobs, and only then mark the events seen.
--
-- One call serves every request that arrived while the previous call was in flight (group
-- commit); each request still gets its own answer from the returned array. The bodies are
-- not passed in: the same MULTI/EXEC transaction writes them first, each with SET NX (Lua
-- would hash every byte of every body it is handed; see Store.accept_batch).
--
-- Why nothing can be half-accepted (Redis runs a script without rollback):
-- * the shebang (without allow-oom) makes Redis refuse the whole script when it is out of
--   memory, or cannot write at all, before any command runs (and the transaction around it
--   is refused whole: an OOM or ACL refusal of a queued command aborts the EXEC);
-- * every key written is declared in KEYS, so an ACL user that may not write one of them is
--   refused before anything runs (job ids are made here, so KEYS[4], a key in arq's job key
--   space that is never written, stands for them);
-- * against any other error part-way, the dedup records come last: an event is "seen" only
--   once its body and its job are written, so the sender's retry is accepted again (a body
--   written before the error stays, and the retry's SET NX leaves it as it is).
--
-- KEYS[1]  queue          P:queue, arq's queue (zset of job ids by run time, ms)
-- KEYS[2]  stats          P:stats
-- KEYS[3]  exams          P:exams, exam ids by their newest event (ms)
-- KEYS[4]  job_key_space  arq:job:P:b-acl-check, never written (see above)
-- then three keys per event, in the order of the events in ARGV:
--   seen         P:seen:E      dedup record
--   releases     P:releases:A  the attempt's releases: event ids by releasedAt (ms)
--   exam_events  P:exam:X      the exam's event ids by arrival (ms)
--
-- ARGV[1]  now_ms
-- ARGV[2]  dedup_ttl_ms
-- ARGV[3]  payload_ttl_ms      the exam index and the jobs
-- ARGV[4]  releases_ttl_ms     outlives any older release's records
-- ARGV[5]  max_events_per_job  at most 15 (a msgpack fixarray header)
-- ARGV[6]  job_head            a handle_events job cut where its event list goes
-- ARGV[7]  job_tail              (shared/contract.py, fanout_job_template)
-- ARGV[8]  job_key_prefix      'arq:job:'
-- ARGV[9]  job_id_prefix       'P:b'; job ids are P:b<count>-<job_token>-<n>
-- ARGV[10] job_token           unique per call: job ids of every receiver never meet
-- then four values per event:
--   event_id, released_ms, job_entry (its msgpack [E, attempt_id, released_ms]), exam_id
--
-- Returns one integer per event: 1 accepted, 0 duplicate (seen within the dedup window,
-- or earlier in this same batch). Numbers are handed to redis.call as the strings they came
-- as: a Lua number would be formatted anew on every call.
local queue_key, stats_key, exams_key = KEYS[1], KEYS[2], KEYS[3]
local now = ARGV[1]
local dedup_ttl, payload_ttl, releases_ttl = ARGV[2], ARGV[3], ARGV[4]
local max_per_job, job_head, job_tail = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local job_key_prefix, job_id_prefix, job_token = ARGV[8], ARGV[9], ARGV[10]
local oldest = tostring(tonumber(now) - tonumber(payload_ttl))

local FIRST_EVENT_KEY, KEYS_PER_EVENT = 5, 3
local FIRST_EVENT_ARG, ARGS_PER_EVENT = 11, 4

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

-- 2. the attempts' releases, the exam index
local exams, exam_members = {}, {}
for _, event in ipairs(accepted) do
  local key, arg = event[1], event[2]
  local releases_key, exam_events_key = KEYS[key + 1], KEYS[key + 2]
  local event_id, released, exam_id = ARGV[arg], ARGV[arg + 1], ARGV[arg + 3]
  -- every release of the attempt: an older one still queued is then never delivered (the
  -- newest wins), and a re-release's email can say what it replaces
  redis.call('ZADD', releases_key, released, event_id)
  redis.call('PEXPIRE', releases_key, releases_ttl)
  -- the exam index: one ZADD per exam of the batch, not one per event
  local members = exam_members[exam_events_key]
  if not members then
    members = {}
    exam_members[exam_events_key] = members
    exams[#exams + 1] = {exam_events_key, exam_id}
  end
  members[#members + 1] = now
  members[#members + 1] = event_id
end
for _, exam in ipairs(exams) do
  local exam_events_key, exam_id = exam[1], exam[2]
  redis.call('ZADD', exam_events_key, unpack(exam_members[exam_events_key]))
  redis.call('PEXPIRE', exam_events_key, payload_ttl)
  redis.call('ZREMRANGEBYSCORE', exam_events_key, '-inf', oldest)
  redis.call('ZADD', exams_key, now, exam_id)
end
redis.call('PEXPIRE', exams_key, payload_ttl)
redis.call('ZREMRANGEBYSCORE', exams_key, '-inf', oldest)

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
  local job_entry = ARGV[event[2] + 2]
  entries[#entries + 1] = job_entry
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
