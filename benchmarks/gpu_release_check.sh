#!/usr/bin/env bash
# One device call: the end-to-end prefill benchmark (DSV2-Lite, EP=1, stock Megatron vs EPS),
# then GPU correctness of the package (EPS vs stock over NCCL at EP=1 with every expert
# backend, overlap on; kernel tests). megatron-core 0.19.x and pytest come from .whl/.
set -uo pipefail
OUT="${OUT:-/tmp/eps_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export MEGATRON_EPS_GIT_COMMIT="${MEGATRON_EPS_GIT_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu_state.txt"
OUT="$OUT" TIMEOUT="${PREFILL_TIMEOUT:-250}" REPEATS="${REPEATS:-3}" WARMUP="${WARMUP:-1}" \
  LAYERS="${LAYERS:-8}" bash benchmarks/gpu_prefill.sh 2>&1 | grep -v -i "warn" | tee "$OUT/prefill.log" | tail -22
timeout "${TEST_TIMEOUT:-280}" python3 -m pytest -q -p no:cacheprovider tests \
  -m "gpu or (slow and not multigpu)" -k "not roundtrip and not prefill" 2>&1 \
  | tee "$OUT/gpu_pytest.log" | tail -12
