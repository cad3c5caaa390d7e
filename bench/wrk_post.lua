-- wrk script: POST the sample body with Basic auth; every request carries a unique
-- attempt id (same length as the sample's), so no two events are duplicates.
-- usage: wrk ... -s bench/wrk_post.lua URL -- BODY_FILE RUN_TAG(2 chars) AUTH_B64
-- done() prints one line "WRKJSON {...}" for the harness.
local threads = {}
local counter = 0
local prefix, suffix, tag

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local body = f:read("*a")
  f:close()
  local s, e = body:find("att_d23f0824128b2f330c5c", 1, true)
  assert(s, "sample attempt id not found")
  prefix, suffix = body:sub(1, s - 1), body:sub(e + 1)
  tag = args[2]
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Basic " .. args[3]
end

function request()
  counter = counter + 1
  -- att_ + 2-char run tag + 2-digit thread + 16-digit counter = 24 characters
  local id = string.format("att_%s%02d%016d", tag, tid, counter)
  return wrk.format(nil, nil, nil, prefix .. id .. suffix)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
