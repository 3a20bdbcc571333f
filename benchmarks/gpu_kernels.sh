#!/usr/bin/env bash
# One device call: GPU tests of the expert kernels, Triton tile sweep, calibration, benchmark.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_kernels.sh [steps]
#   steps: comma list of test,tune,calibrate,bench (default: all). Results go to $OUT (or ./.eps_out).
set -u
OUT=${OUT:-.eps_out}
mkdir -p "$OUT"
STEPS=${1:-test,tune,calibrate,bench}
export PYTHONUNBUFFERED=1
if ! python3 -c "import megatron.core" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
has() { [[ ",$STEPS," == *",$1,"* ]]; }
if has test; then
  timeout 150 python3 -m pytest -q tests -m gpu -k "not interpreter" 2>&1 | tail -25 | tee "$OUT/pytest.txt"
fi
if has tune; then
  timeout ${TUNE_TIMEOUT:-130} python3 benchmarks/tune_triton.py --out "$OUT/tune.json" ${TUNE_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/tune.txt"
fi
PROFILE=${PROFILE:-$OUT/profile.json}
if has calibrate; then
  timeout ${CAL_TIMEOUT:-150} python3 -m megatron_eps.experts.calibrate --shape 5120,1536,20 --shape 2048,1408,64 \
    --shape 4096,14336,4 --target-ms ${TARGET_MS:-15} --no-progress --out "$PROFILE" 2>&1 | grep -v Warning | tail -5
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-170} python3 benchmarks/bench_experts.py --profile "$PROFILE" --target-ms ${TARGET_MS:-15} \
    --stock --git-commit "${EPS_GIT_COMMIT:-unknown}" --out "$OUT/bench.json" 2>&1 | grep -v Warning | tee "$OUT/bench.txt" | tail -60
fi
