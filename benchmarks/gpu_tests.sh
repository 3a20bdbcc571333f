#!/usr/bin/env bash
# One device call: the whole test suite on one GPU (NCCL at EP=1; CPU-only cases run as on CI)
# except the tests that need several GPUs (marker multigpu). Log: $OUT/gpu_pytest.log.
set -uo pipefail
OUT="${OUT:-/tmp/eps_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu_state.txt"
timeout "${PYTEST_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider -rs tests -m "${TEST_MARK:-not multigpu}" 2>&1 \
  | grep -v "SyntaxWarning\|Evict LRU\|^$" | tee "$OUT/gpu_pytest.log" | tail -40
