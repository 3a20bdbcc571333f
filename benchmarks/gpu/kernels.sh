# Sourced by benchmarks/gpu.sh kernels (one GPU; every step can be switched off):
#   1. TESTS:     GPU tests of the expert kernels (bf16 vs float64) and self-calibration (marker gpu)
#   2. TUNE:      Triton tile sweep at weight-bound loads (TUNE_SHAPES, TUNE_LOADS)
#   3. CALIBRATE: megatron-eps-calibrate on the shipped shapes, alone and beside a copy-engine
#                 copy -> $OUT/experts_<gpu>.json (the profile's experts section)
#   4. BENCH:     bench_experts.py over seven shapes, the selector with tables / self-calibration /
#                 no profile (BENCH_PROFILE: the profile to use; default the one just written)
#   5. OVERHEAD:  bench_autotune_overhead.py: first forward of a 27-layer stack with and without
#                 self-calibration
# Self-calibration caches must not leak between steps or survive from an earlier call.
export MEGATRON_EPS_KERNEL_CACHE="$OUT/.kernel_cache.json"
if [ "${TESTS:-1}" = "1" ]; then
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests/unit/experts \
    tests/unit/test_row_kernels.py -m gpu 2>&1 | tail -4 | tee "$OUT/h200_pytest.log"
fi
if [ "${TUNE:-1}" = "1" ]; then
  timeout "${TUNE_TIMEOUT:-150}" python3 benchmarks/tune_triton.py --out "$OUT/tune_triton_h200.json" \
    --shapes "${TUNE_SHAPES:-qwen3_30b_ep2,h4096_f1536_n16,dsv3_ep8,dsv2_lite}" --loads "${TUNE_LOADS:-8,32,128}" \
    --skews 0 ${TUNE_ARGS:-} 2>&1 | grep -v -i warn | grep -v '^   kernel' | grep -v 'errors:' | tee "$OUT/tune_triton_h200.txt" | tail -14
fi
PROFILE="$OUT/experts_$SLUG.json"
if [ "${CALIBRATE:-1}" = "1" ]; then
  timeout "${CAL_TIMEOUT:-300}" python3 -m megatron_eps.calibrate kernels --shape 5120,1536,20 --shape 5120,1536,80 \
    --shape 2048,1408,64 --shape 4096,14336,4 --target-ms "${TARGET_MS:-10}" --beside-copy --no-progress \
    --out "$PROFILE" 2>&1 | grep -v -i warn | tail -3
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('beside-copy check:', d['beside_copy'])" "$PROFILE"
fi
if [ "${BENCH:-1}" = "1" ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_experts.py --profile "${BENCH_PROFILE:-$PROFILE}" \
    --target-ms "${TARGET_MS:-10}" --git-commit "$MEGATRON_EPS_GIT_COMMIT" --out "$OUT/bench_experts_h200.json" \
    ${BENCH_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/bench_experts_h200.txt" | grep -v '^ ' | tail -8
  python3 -c "
import json,sys; s=json.load(open(sys.argv[1]))['summary']
for k,v in s['selections'].items(): print(k, v['geomean'], v['worst'], {a: (b['geomean'], b['worst']) for a,b in v['per_shape'].items()})
print('self-calibration', {k: v for k, v in s['self_calibration'].items() if k != 'per_bucket'})" "$OUT/bench_experts_h200.json"
fi
if [ "${OVERHEAD:-1}" = "1" ]; then
  timeout "${OVERHEAD_TIMEOUT:-240}" python3 benchmarks/bench_autotune_overhead.py \
    --git-commit "$MEGATRON_EPS_GIT_COMMIT" --out "$OUT/autotune_overhead_h200.json" 2>&1 | grep -v -i warn | tail -6
fi
