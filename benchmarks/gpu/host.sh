# Sourced by benchmarks/gpu.sh host (one GPU, EP=1): the layer's host path against the stock
# + grouped baseline. Steps switched by env (1 = run):
#   TESTS  the tests marked gpu                                  -> host_pytest.log
#   TRACE  trace_layer_ops: EPS N=1 vs stock + grouped, by op and
#          by host function (TRACE_POINTS; hostpath is a layer of
#          microsecond GEMMs, whose forward time is its host path)  -> ops_vs_grouped.json / .txt
#   LAYER  bench_layer_multigpu at EP=1 with both baselines
#          (LAYER_MODELS, LAYER_TOKENS, MIXTRAL_TOKENS)           -> layer_ep1.json / .log
#   PREFILL  (default 0) the DSV2-Lite prefill against both baselines at PREFILL_PROMPTS
#          (default 4096), LAYERS layers (default 4), traced (--profile-dir): first with the
#          kernel cache the steps above left, then with a fresh one (PREFILL_CACHES,
#          default "kept fresh")                                     -> prefill_<cache>.json,
#          prefill_traces.tgz (traces and the caches), prefill_traces.txt (summarize_trace.py)
if [ "${TESTS:-1}" = "1" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests -m gpu 2>&1 \
    | grep -v "SyntaxWarning\|Evict LRU\|^$" > "$OUT/host_pytest.log"; tail -4 "$OUT/host_pytest.log"
fi
if [ "${TRACE:-1}" = "1" ]; then
  timeout "${TRACE_TIMEOUT:-200}" torchrun --standalone --nproc-per-node 1 benchmarks/trace_layer_ops.py \
    --out "$OUT/ops_vs_grouped.json" --points "${TRACE_POINTS:-hostpath:1024,dsv2lite:4096,dsv2:4096,mixtral:8192}" \
    --variants "grouped;pipeline_degree=1" --python-profile 40 --top 12 2>&1 | grep -v -i warn \
    > "$OUT/ops_vs_grouped.txt"; grep "==\|{'" "$OUT/ops_vs_grouped.txt" | grep -v "ops whose\|host functions"
fi
if [ "${LAYER:-1}" = "1" ]; then
  timeout "${LAYER_TIMEOUT:-240}" torchrun --standalone --nproc-per-node 1 benchmarks/bench_layer_multigpu.py \
    --out "$OUT/layer_ep1.json" --models "${LAYER_MODELS:-dsv2lite,dsv2,mixtral}" \
    --tokens "${LAYER_TOKENS:-4096,16384}" --mixtral-tokens "${MIXTRAL_TOKENS:-8192,16384}" \
    --degrees 1 --transports nccl --repeats "${LAYER_REPEATS:-15}" "$@" 2>&1 | grep -v -i warn \
    | grep -v '^{' > "$OUT/layer_ep1.log"; tail -12 "$OUT/layer_ep1.log"
fi
if [ "${PREFILL:-0}" = "1" ]; then
  kept_cache="$(python3 -c 'import torch; from megatron_eps.experts.autotune import default_cache_path as p; print(p(torch.cuda.get_device_name(0)))')"
  mkdir -p /tmp/prefill_traces
  for cache in ${PREFILL_CACHES:-kept fresh}; do
    if [ "$cache" = fresh ]; then export MEGATRON_EPS_KERNEL_CACHE=/tmp/prefill_traces/kernels_fresh.json; fi
    [ -f "$kept_cache" ] && cp "$kept_cache" /tmp/prefill_traces/kernels_before_$cache.json
    LAYERS="${LAYERS:-4}" PROMPTS="${PREFILL_PROMPTS:-4096}" JSON="$OUT/prefill_$cache.json" \
      EXTRA_ARGS="--grouped-baseline --profile-dir /tmp/prefill_traces/$cache" \
      bash benchmarks/gpu_prefill.sh > "/tmp/prefill_traces/prefill_$cache.log" 2>&1
    grep "speedup\|exit code" "/tmp/prefill_traces/prefill_$cache.log"
    python3 - "$OUT/prefill_$cache.json" <<'PY'
import json, sys
for row in json.load(open(sys.argv[1]))["results"]:
    print({m: (round(row[m]["median_s"] * 1e3, 2), row[m].get("warmup_steps")) for m in ("stock", "grouped", "eps") if m in row},
          "vs grouped", round(row.get("speedup_vs_grouped", 0), 3), [d["expert_kernels"] for d in row.get("eps_decisions", [])])
PY
  done
  unset MEGATRON_EPS_KERNEL_CACHE
  python3 benchmarks/summarize_trace.py /tmp/prefill_traces/*/*.json --top 10 \
    --out /tmp/prefill_traces/summary.json > "$OUT/prefill_traces.txt" 2>&1
  grep "^==\|GPU span" "$OUT/prefill_traces.txt"
  tar -czf "$OUT/prefill_traces.tgz" -C /tmp prefill_traces
fi
