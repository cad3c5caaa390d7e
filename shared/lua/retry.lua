-- Queue failed pairs again (``examhook failures retry``): a fresh round of attempts.
--
-- ARGV: prefix, now_ms, ttl_ms, then three values per pair: event_id, integration, job_bytes
-- Returns {queued, skipped}. Skipped, and left as they are: pairs no longer failed, whose
-- payload is gone, or whose job is running right now (try again in a moment). A pair
-- delivered meanwhile only loses its stale failure entry.
local p, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local queued, skipped = 0, 0
for k = 4, #ARGV, 3 do
  local e, i = ARGV[k], ARGV[k + 1]
  local suffix = e .. ':' .. i
  local pair = p .. ':pair:' .. suffix
  local event_key = p .. ':event:' .. e
  local job_id = p .. ':' .. suffix
  if redis.call('EXISTS', p .. ':delivered:' .. suffix) == 1 then
    redis.call('ZREM', p .. ':failures', suffix)
    skipped = skipped + 1
  elseif not redis.call('ZSCORE', p .. ':failures', suffix)
      or redis.call('EXISTS', event_key) == 0
      or redis.call('EXISTS', 'arq:in-progress:' .. job_id) == 1 then
    skipped = skipped + 1
  else
    redis.call('ZREM', p .. ':failures', suffix)
    redis.call('HSET', pair, 'attempts', '0', 'status', 'queued', 'last_error', '')
    redis.call('HINCRBY', pair, 'rounds', 1)
    redis.call('SET', 'arq:job:' .. job_id, ARGV[k + 2], 'PX', ttl)
    redis.call('ZADD', p .. ':queue', now, job_id)
    -- only ever lengthen: other integrations' failures may keep this body longer
    if redis.call('PTTL', event_key) < ttl then redis.call('PEXPIRE', event_key, ttl) end
    queued = queued + 1
  end
end
return {queued, skipped}
