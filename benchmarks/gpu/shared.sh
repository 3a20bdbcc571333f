# Sourced by benchmarks/gpu.sh shared (ONE GPU, two ranks on it over gloo; functional checks of
# the multi-rank paths, copy engines included; no timing means anything here):
#   1. PROBE:   benchmarks/ranks_share_gpu_probe.py (gloo collectives on CUDA tensors, symmetric
#               memory, a copy and a flag between the two processes); the rest needs it to pass
#   2. TESTS:   the multigpu tests (TEST_MARK, TEST_K, TEST_PATHS) with MEGATRON_EPS_RANKS_SHARE_GPU=1;
#               stopped at TEST_TIMEOUT with SIGINT, so that pytest still reports its failures
#   3. PREFILL: the DSV2-Lite prefill at EP=2 (LAYERS, PROMPTS, PREFILL_ARGS), stock vs stock +
#               grouped vs EPS on the copy engines, with peer-wait deadlines and stacks on SIGTERM
#               (PREFILL_BASE_ARGS, default --grouped-baseline, replaces the baseline flag)
#   4. SOAK:    soak_multigpu.py, SOAK_STEPS forwards (SOAK_ARGS)
export MEGATRON_EPS_RANKS_SHARE_GPU=1
timeout "${PROBE_TIMEOUT:-150}" torchrun --standalone --nproc-per-node 2 benchmarks/ranks_share_gpu_probe.py \
  --out "$OUT/ranks_share_gpu_probe.json" 2>&1 | grep -v -i warn | tail -12
if ! python3 -c "import json,sys; r=json.load(open('$OUT/ranks_share_gpu_probe.json')); sys.exit(0 if all(v['ok'] for g in r for v in g.values() if isinstance(v, dict) and 'ok' in v) else 1)" 2>/dev/null; then
  echo "shared.sh: the probe failed; two ranks cannot share this GPU"; return 1 2>/dev/null || exit 1
fi
if [ "${TESTS:-1}" = "1" ]; then
  timeout --signal=INT --kill-after=20 "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider \
    -rfEs --tb=short ${TEST_PATHS:-tests} -m "${TEST_MARK:-multigpu}" ${TEST_K:+-k "$TEST_K"} 2>&1 \
    | grep -v "SyntaxWarning\|Evict LRU\|^$" | tee "$OUT/shared_pytest.log" | tail -60
fi
if [ "${PREFILL:-1}" = "1" ]; then
  MEGATRON_EPS_WAIT_TIMEOUT_S="${WAIT_TIMEOUT_S:-90}" MEGATRON_EPS_STACKS_ON_SIGTERM=1 OUT="$OUT" NPROC=2 \
    TIMEOUT="${PREFILL_TIMEOUT:-240}" LAYERS="${LAYERS:-4}" PROMPTS="${PROMPTS:-4096}" REPEATS=1 ROUNDS=1 WARMUP=1 \
    EXTRA_ARGS="${PREFILL_BASE_ARGS---grouped-baseline} --eps-transport copy_engine ${PREFILL_ARGS:-}" JSON="$OUT/prefill_shared.json" \
    bash benchmarks/gpu_prefill.sh 2>&1 | grep -v -i warn > "$OUT/prefill_shared.log"; tail -30 "$OUT/prefill_shared.log"
fi
if [ "${SOAK:-0}" = "1" ]; then
  timeout "${SOAK_TIMEOUT:-150}" torchrun --standalone --nproc-per-node 2 benchmarks/soak_multigpu.py \
    --out "$OUT/soak_shared.json" --steps "${SOAK_STEPS:-100}" --time-limit-s 120 ${SOAK_ARGS:-} 2>&1 \
    | grep -v -i warn | grep -E "^soak|Error|error" | tail -5
fi
