#!/usr/bin/env bash
# GPU check + benchmark of the pipeline (issue 4), one call of the device tool on one H100/H200,
# megatron-core 0.19.x carried as a wheel in .whl/. Writes under $OUT:
#   pipeline_pytest.log       the tests marked gpu
#   bench_pipeline.json       all points, calibration, targets (benchmarks/bench_pipeline.py)
#   bench.log                 its console output (table at the end)
#   trace_dsv2.json / .png    Chrome trace and two-stream timeline of one layer
#   <gpu slug>.json           megatron-eps-calibrate pipeline (DSV2 shape) for megatron_eps/profiles/
# EPS_GIT_COMMIT: the commit of the tree (the device copy is not a git repository).
set -uo pipefail
OUT="${OUT:-/tmp/eps_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu_state.txt"
timeout "${PYTEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider tests -m gpu 2>&1 | tee "$OUT/pipeline_pytest.log" | tail -25
timeout "${BENCH_TIMEOUT:-290}" python3 benchmarks/bench_pipeline.py --out "$OUT/bench_pipeline.json" \
  --trace "$OUT/trace_dsv2.json" --commit "${EPS_GIT_COMMIT:-unknown}" \
  --time-budget-s "${BENCH_BUDGET:-230}" "$@" 2>&1 | grep -v -i "warn" | tee "$OUT/bench.log"
timeout "${CALIBRATE_TIMEOUT:-120}" python3 -m megatron_eps.calibrate pipeline --shape 5120,1536,20 \
  --topk 6 --shared-ffn 3072 --out "$OUT" 2>&1 | grep -v -i "warn" | tee "$OUT/calibrate.log" | tail -4
