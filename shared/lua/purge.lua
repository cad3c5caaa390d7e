-- Forget failed pairs (``examhook failures purge``): the failure entry, state and attempt
-- log, and any job of the pair that is queued but not running.
--
-- ARGV: prefix, then two values per pair: event_id, integration
-- Returns how many failures were removed. A pair that is no longer failed (delivered, or
-- queued again by a concurrent ``failures retry``) is left alone.
local p = ARGV[1]
local removed = 0
for k = 2, #ARGV, 2 do
  local suffix = ARGV[k] .. ':' .. ARGV[k + 1]
  if redis.call('ZREM', p .. ':failures', suffix) == 1 then
    local job_id = p .. ':' .. suffix
    if redis.call('EXISTS', 'arq:in-progress:' .. job_id) == 0 then
      redis.call('ZREM', p .. ':queue', job_id)
      redis.call('DEL', 'arq:job:' .. job_id, 'arq:retry:' .. job_id)
    end
    redis.call('DEL', p .. ':pair:' .. suffix, p .. ':attempts:' .. suffix)
    removed = removed + 1
  end
end
return removed
