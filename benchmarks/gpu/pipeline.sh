# Sourced by benchmarks/gpu.sh pipeline (one GPU):
# Writes under $OUT (megatron-core carried as a wheel in .whl/; NCCL multicast off):
#   pipeline_pytest.log       the tests marked gpu
#   bench_pipeline.json       all points, calibration, targets (benchmarks/bench_pipeline.py)
#   bench.log                 its console output (table at the end)
#   trace_dsv2.json / .png    Chrome trace and two-stream timeline of one layer
#   <gpu slug>.json           megatron-eps-calibrate pipeline (DSV2 shape) for megatron_eps/profiles/
# EPS_GIT_COMMIT: the commit of the tree (the device copy is not a git repository).
timeout "${PYTEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider tests -m gpu 2>&1 | tee "$OUT/pipeline_pytest.log" | tail -25
timeout "${BENCH_TIMEOUT:-290}" python3 benchmarks/bench_pipeline.py --out "$OUT/bench_pipeline.json" \
  --trace "$OUT/trace_dsv2.json" --commit "${EPS_GIT_COMMIT:-unknown}" \
  --time-budget-s "${BENCH_BUDGET:-230}" "$@" 2>&1 | grep -v -i "warn" | tee "$OUT/bench.log"
timeout "${CALIBRATE_TIMEOUT:-120}" python3 -m megatron_eps.calibrate pipeline --shape 5120,1536,20 \
  --topk 6 --shared-ffn 3072 --out "$OUT" 2>&1 | grep -v -i "warn" | tee "$OUT/calibrate.log" | tail -4
