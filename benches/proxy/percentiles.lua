-- Prints wrk's latency distribution beyond its own --latency lines (p95 to p99.9, max), in
-- microseconds, as one line that benches/proxy/run.sh adds to its log.
done = function(summary, latency, requests)
  local out = {}
  for _, p in ipairs({ 75, 95, 98, 99, 99.5, 99.9 }) do
    out[#out + 1] = string.format("p%s=%.0f", p, latency:percentile(p))
  end
  io.write(string.format("percentiles_us %s max=%.0f\n", table.concat(out, " "), latency.max))
end
