#!/usr/bin/env bash
# One device call: benchmarks/diag_overlap.py (host costs, carve-out, emulator fidelity, sweep).
set -uo pipefail
OUT="${OUT:-/tmp/eps_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu_state.txt"
timeout "${DIAG_TIMEOUT:-400}" python3 benchmarks/diag_overlap.py --out "$OUT/diag.json" "$@" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/diag.log"
