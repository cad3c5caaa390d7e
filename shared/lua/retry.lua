-- Queue failed pairs again (``examhook failures retry``): a fresh round of attempts.
--
-- ARGV: prefix, now_ms, ttl_ms, then three values per pair: event_id, integration, job_bytes
-- Returns {queued, skipped}: skipped pairs were already delivered, or are no longer failed.
local p, now, ttl = ARGV[1], ARGV[2], ARGV[3]
local queued, skipped = 0, 0
for k = 4, #ARGV, 3 do
  local e, i = ARGV[k], ARGV[k + 1]
  local suffix = e .. ':' .. i
  local pair = p .. ':pair:' .. suffix
  local removed = redis.call('ZREM', p .. ':failures', suffix)
  if redis.call('EXISTS', p .. ':delivered:' .. suffix) == 1 or removed == 0
     or redis.call('EXISTS', p .. ':event:' .. e) == 0 then
    skipped = skipped + 1
  else
    redis.call('HSET', pair, 'attempts', '0', 'status', 'queued', 'last_error', '')
    redis.call('HINCRBY', pair, 'rounds', 1)
    local job_id = p .. ':' .. e .. ':' .. i
    redis.call('SET', 'arq:job:' .. job_id, ARGV[k + 2], 'PX', ttl)
    redis.call('ZADD', p .. ':queue', now, job_id)
    redis.call('PEXPIRE', p .. ':event:' .. e, ttl)
    queued = queued + 1
  end
end
return {queued, skipped}
