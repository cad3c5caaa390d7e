#!lua flags=no-writes
-- The delivery state of every (event, integration) pair of a chunk of events, in one round
-- trip: ``examhook report`` and the admin Exams pages. Reads only (no-writes: it also runs on
-- a replica and while Redis is full).
--
-- KEYS[1]  failures  P:failures
-- then per event, in the order of the event ids in ARGV:
--   body       P:event:E
--   then two keys per integration, in the order of the names in ARGV:
--     pair       P:pair:E:I
--     delivered  P:delivered:E:I
--
-- ARGV[1]  with_body          '1': also return each body (false when it expired)
-- ARGV[2]  integration_count  n
-- ARGV[3 .. 2+n]              the integration names
-- then one event id per event
--
-- Returns one {body or false, states} per event; states has one character per integration:
--   d delivered (its marker is set)   f failed (in P:failures)   s superseded
--   r a retry is scheduled            w being sent               q queued again, not attempted
--   n no record yet (its first attempt has not been made)
local failures_key = KEYS[1]
local with_body, count = ARGV[1], tonumber(ARGV[2])
local FIRST_NAME, FIRST_EVENT_KEY = 3, 2
local FIRST_EVENT = FIRST_NAME + count
local KEYS_PER_EVENT = 1 + 2 * count

local codes = {retry = 'r', sending = 'w', superseded = 's', delivered = 'd', failed = 'f'}
local out = {}
for index = 0, #ARGV - FIRST_EVENT do
  local event_id = ARGV[FIRST_EVENT + index]
  local key = FIRST_EVENT_KEY + index * KEYS_PER_EVENT
  local body = false
  if with_body == '1' then body = redis.call('GET', KEYS[key]) end
  local states = {}
  for n = 0, count - 1 do
    local pair_key, delivered_key = KEYS[key + 1 + 2 * n], KEYS[key + 2 + 2 * n]
    local integration = ARGV[FIRST_NAME + n]
    local state
    if redis.call('EXISTS', delivered_key) == 1 then
      state = 'd'
    elseif redis.call('ZSCORE', failures_key, event_id .. ':' .. integration) then
      state = 'f'
    else
      local status = redis.call('HGET', pair_key, 'status')
      if status then
        state = codes[status] or 'q'
      else
        state = 'n'
      end
    end
    states[#states + 1] = state
  end
  out[#out + 1] = {body, table.concat(states)}
end
return out
