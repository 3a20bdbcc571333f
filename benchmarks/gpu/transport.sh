# Sourced by benchmarks/gpu.sh transport (several GPUs of one node; every step can be switched off):
#   1. TESTS:     the tests marked gpu or multigpu (both transports' equivalence at EP=2, the
#                 bf16 equivalence grid over NCCL, the permutation kernels, ranks agreeing)
#   2. CALIBRATE: megatron-eps-calibrate link: each transport's link and overlap beside a
#                 grouped GEMM, merged into a copy of the shipped profile as $OUT/<gpu>.json
#   3. BENCH:     the layer benchmark: EPS per transport vs stock and stock + grouped GEMM, traces
#   4. SOAK:      1,000 forwards with random loads (no hang, no leak, outputs equal stock)
#   5. PREFILL:   DSV2-Lite prefill at EP = #GPUs, stock vs stock + grouped vs EPS
# BENCH_ARGS / PREFILL_ARGS add flags (e.g. BENCH_ARGS="--local-rows together,apart");
# SOAK_ARGS too (e.g. "--local-rows apart"); BENCH_PROFILE names a profile (default: the shipped one);
# PREFILL_ROUNDS (default 2) sets how many alternating rounds of the three modes the prefill
# times. (Its earlier runs at EP=2 stopped at their limits while comparing every token's logits
# on the host; on megatron-core 0.19 only the last token's are computed now. Two ranks sharing
# one H200 ran it at 4K-32K in about a minute.)
# The whole script takes ~12 min on x2; the device allows 10 min a call, so split it, e.g.
#   CALIBRATE=0 PREFILL=0 ...   then   TESTS=0 CALIBRATE=0 BENCH=0 SOAK=0 ...
if [ "${TESTS:-1}" = "1" ]; then
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider tests \
    -m "${TEST_MARK:-multigpu or gpu}" -k "${TEST_K:-not fp32}" 2>&1 | tee "$OUT/x2_pytest.log" | tail -8
fi
PROFILE="$OUT/$SLUG.json"
if [ "${CALIBRATE:-1}" = "1" ]; then
  cp "megatron_eps/profiles/$SLUG.json" "$PROFILE" 2>/dev/null || cp megatron_eps/profiles/nvidia_h100_80gb_hbm3.json "$PROFILE"
  timeout 120 torchrun --standalone --nproc-per-node "$NGPU" -m megatron_eps.calibrate link \
    --out "$PROFILE" --min-gain ${MIN_GAIN:-0.03} 2>&1 | grep -v -i warn | tail -4
fi
# The benchmark and the soak use the profile auto finds by itself (shipped for this GPU), unless
# BENCH_PROFILE names one (e.g. the one just written).
PROFILE_ARG=""; [ -n "${BENCH_PROFILE:-}" ] && PROFILE_ARG="--cost-profile $BENCH_PROFILE"
[ "${BENCH:-1}" = "1" ] && timeout "${BENCH_TIMEOUT:-330}" torchrun --standalone --nproc-per-node "$NGPU" benchmarks/bench_layer_multigpu.py \
  --out "$OUT/layer_x2.json" --trace-dir "$OUT/traces" $PROFILE_ARG ${BENCH_ARGS:-} 2>&1 \
  | grep -v -i warn | grep -v '^{' | tee "$OUT/layer_x2.log" | tail -14
if [ "${SOAK:-1}" = "1" ]; then
  timeout 240 torchrun --standalone --nproc-per-node "$NGPU" benchmarks/soak_multigpu.py \
    --out "$OUT/soak_x2.json" --steps "${SOAK_STEPS:-1000}" $PROFILE_ARG --time-limit-s 190 ${SOAK_ARGS:-} 2>&1 \
    | grep -v -i warn | grep -E "^soak|Error|error" | tail -5
fi
if [ "${PREFILL:-1}" = "1" ]; then
  # A rank that waits for its peer longer than this raises PeerTimeoutError, and a run stopped
  # at its time limit prints each rank's stacks (instead of ending with no word of where).
  MEGATRON_EPS_WAIT_TIMEOUT_S="${WAIT_TIMEOUT_S:-120}" MEGATRON_EPS_STACKS_ON_SIGTERM=1 OUT="$OUT" NPROC="$NGPU" TIMEOUT="${PREFILL_TIMEOUT:-400}" LAYERS="${LAYERS:-4}" PROMPTS="${PROMPTS:-4096,16384,32768}" REPEATS="${PREFILL_REPEATS:-3}" ROUNDS="${PREFILL_ROUNDS:-2}" WARMUP=1 \
    EXTRA_ARGS="--grouped-baseline --eps-transport copy_engine ${PREFILL_ARGS:-}" JSON="$OUT/prefill_x2.json" \
    bash benchmarks/gpu_prefill.sh 2>&1 | grep -v -i warn > "$OUT/prefill_x2.log"; tail -14 "$OUT/prefill_x2.log"
fi
