-- wrk script for bench/auth.sh, configured by environment variables:
--   BENCH_METHOD     GET (default) or POST
--   BENCH_BODY_FILE  request body (sent as application/json)
--   BENCH_INM        If-None-Match header value
--   BENCH_TOKEN      bearer token (none: no Authorization header)
-- At the end it prints one machine-readable line:
--   BENCH_RESULT <requests> <req/s> <p50 ms> <p99 ms> <status errors> <socket errors>

wrk.method = os.getenv("BENCH_METHOD") or "GET"

local body_file = os.getenv("BENCH_BODY_FILE")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
end

local inm = os.getenv("BENCH_INM")
if inm and inm ~= "" then
  wrk.headers["If-None-Match"] = inm
end

local token = os.getenv("BENCH_TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format("BENCH_RESULT %d %.1f %.3f %.3f %d %d\n",
    summary.requests, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status, e.connect + e.read + e.write + e.timeout))
end
