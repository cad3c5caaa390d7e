#!lua flags=allow-oom
-- Keep a pair's lock while its worker holds an outcome it could not record yet (Redis
-- refused the record), so nobody sends the pair again meanwhile. allow-oom: it only extends.
--
-- KEYS[1]  lock  P:lock:E:I
--
-- ARGV[1]  token
-- ARGV[2]  ttl_ms
-- Returns 1 (extended), 2 (it had expired: taken again) or 0 (another claim holds it).
local lock_key = KEYS[1]
local token, ttl = ARGV[1], ARGV[2]
local holder = redis.call('GET', lock_key)
if holder == token then
  redis.call('PEXPIRE', lock_key, ttl)
  return 1
end
if not holder then
  redis.call('SET', lock_key, token, 'PX', ttl)
  return 2
end
return 0
