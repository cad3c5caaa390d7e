-- Accept a batch of events atomically: dedup, store the body, enqueue arq's jobs.
-- One call serves every request that arrived while the previous call was in flight
-- (group commit); each request still gets its own answer from the returned array.
--
-- ARGV: prefix, now_ms, dedup_ttl_ms, payload_ttl_ms, latest_ttl_ms, max_events_per_job,
--       job_head, job_tail, job_token, then five values per event:
--       event_id, attempt_id, released_ms, body, job_entry
-- The accepted events go into handle_events jobs of at most max_events_per_job (<= 15)
-- each: job_head .. msgpack array header .. their job_entry values .. job_tail
-- (see shared/contract.py, fanout_job_template).
-- Returns one integer per event: 1 accepted, 0 duplicate (seen within the window).
local p, now, dedup_ttl, ttl, latest_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local per_job, head, tail, token = tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
local queue = p .. ':queue'
local out, accepted, entries, jobs = {}, 0, {}, 0

local function enqueue()
  jobs = jobs + 1
  local job_id = p .. ':b' .. #entries .. '-' .. token .. '-' .. jobs
  -- a msgpack fixarray header holds up to 15 items
  local job = head .. string.char(0x90 + #entries) .. table.concat(entries) .. tail
  redis.call('SET', 'arq:job:' .. job_id, job, 'PX', ttl)
  redis.call('ZADD', queue, now, job_id)
  entries = {}
end

for i = 10, #ARGV, 5 do
  local id = ARGV[i]
  if redis.call('SET', p .. ':seen:' .. id, now, 'NX', 'PX', dedup_ttl) then
    redis.call('SET', p .. ':event:' .. id, ARGV[i + 3], 'PX', ttl)
    -- newest release per attempt: an older release still queued is then never delivered.
    -- It lives as long as anything of an older release could (a kept failure, retried).
    local latest = p .. ':latest:' .. ARGV[i + 1]
    local current = tonumber(redis.call('GET', latest) or '0')
    if tonumber(ARGV[i + 2]) >= current then
      redis.call('SET', latest, ARGV[i + 2], 'PX', latest_ttl)
    end
    entries[#entries + 1] = ARGV[i + 4]
    if #entries == per_job then enqueue() end
    out[#out + 1] = 1
    accepted = accepted + 1
  else
    out[#out + 1] = 0
  end
end
if #entries > 0 then enqueue() end
if accepted > 0 then redis.call('HINCRBY', p .. ':stats', 'accepted', accepted) end
if #out > accepted then redis.call('HINCRBY', p .. ':stats', 'duplicate', #out - accepted) end
return out
