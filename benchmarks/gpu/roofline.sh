# Sourced by benchmarks/gpu.sh roofline (one GPU, EP=1): the MoE layer against the GPU's limits.
# Steps switched by env:
#   ROOF_TESTS  pytest files (space-separated) run with -m gpu first, e.g. the kernel tests of
#               the files a change touched (default none)                  -> roofline_pytest.log
#   ROOF_BENCH  (default 1) bench_roofline.py over ROOF_MODELS (default all four) x ROOF_TOKENS
#               (default 4096,16384,32768), ROOF_REPEATS samples (default 10), one profiled
#               forward per variant and point; args passed on   -> roofline.json / roofline.log,
#               roofline_traces.tgz (the traces), roofline_traces.txt (summarize_trace.py of
#               the grouped and EPS traces)
if [ -n "${ROOF_TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m gpu $ROOF_TESTS 2>&1 \
    | grep -v "SyntaxWarning\|Evict LRU\|^$" > "$OUT/roofline_pytest.log"; tail -4 "$OUT/roofline_pytest.log"
fi
if [ "${ROOF_BENCH:-1}" = "1" ]; then
  rm -rf /tmp/roofline_traces; mkdir -p /tmp/roofline_traces
  timeout "${ROOF_TIMEOUT:-420}" python3 benchmarks/bench_roofline.py --out "$OUT/roofline.json" \
    --models "${ROOF_MODELS:-dsv2lite,dsv2,mixtral,qwen3}" --tokens "${ROOF_TOKENS:-4096,16384,32768}" \
    --repeats "${ROOF_REPEATS:-10}" --trace-dir /tmp/roofline_traces "$@" 2>&1 | grep -v -i warn \
    > "$OUT/roofline.log"; sed -n '/^== roofline/,$p' "$OUT/roofline.log"
  ls /tmp/roofline_traces/*_grouped.json /tmp/roofline_traces/*_eps.json >/dev/null 2>&1 && \
    python3 benchmarks/summarize_trace.py /tmp/roofline_traces/*_grouped.json \
      /tmp/roofline_traces/*_eps.json --top 8 > "$OUT/roofline_traces.txt" 2>&1
  rm -f /tmp/roofline_traces/*_stock.json  # large, and their breakdown is in the JSON
  tar -czf "$OUT/roofline_traces.tgz" -C /tmp roofline_traces
fi
