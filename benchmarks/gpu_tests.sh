#!/usr/bin/env bash
# One device call: the whole unit-test suite on the GPU (NCCL at EP=1; multi-rank cases skip
# above the GPU count; CPU-only cases run as on CI). Log: $OUT/gpu_pytest.log.
set -uo pipefail
OUT="${OUT:-/tmp/eps_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu_state.txt"
timeout "${PYTEST_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider -rs tests/unit_tests 2>&1 \
  | grep -v "SyntaxWarning\|Evict LRU\|^$" | tee "$OUT/gpu_pytest.log" | tail -40
