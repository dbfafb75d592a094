-- wrk script for the submit benchmark: POST one io.echo job per request, and print a
-- machine-readable summary line ("BENCH_JSON {...}") when the run is over.
-- The body can be overridden with the BENCH_BODY environment variable.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or '{"task": "io.echo", "args": [1]}'
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors_connect": %d, "errors_read": %d, "errors_write": %d, ' ..
    '"errors_status": %d, "errors_timeout": %d, ' ..
    '"latency_mean_us": %.1f, "latency_p50_us": %d, "latency_p99_us": %d, ' ..
    '"latency_max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(99), latency.max))
end
