-- Accept a batch of events atomically: dedup, store the body, enqueue arq's job.
-- One call serves every request that arrived while the previous call was in flight
-- (group commit); each request still gets its own answer from the returned array.
--
-- ARGV: prefix, now_ms, dedup_ttl_ms, payload_ttl_ms, latest_ttl_ms, then five values per event:
--       event_id, attempt_id, released_ms, body, job_bytes
-- Returns one integer per event: 1 accepted, 0 duplicate (seen within the window).
local p, now, dedup_ttl, ttl, latest_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local queue = p .. ':queue'
local out, accepted = {}, 0
for i = 6, #ARGV, 5 do
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
    local job_id = p .. ':' .. id
    redis.call('SET', 'arq:job:' .. job_id, ARGV[i + 4], 'PX', ttl)
    redis.call('ZADD', queue, now, job_id)
    out[#out + 1] = 1
    accepted = accepted + 1
  else
    out[#out + 1] = 0
  end
end
if accepted > 0 then redis.call('HINCRBY', p .. ':stats', 'accepted', accepted) end
if #out > accepted then redis.call('HINCRBY', p .. ':stats', 'duplicate', #out - accepted) end
return out
