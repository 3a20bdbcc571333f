#!/usr/bin/env bash
# GPU check of the core (run through the device tool on one H100/H200, megatron-core 0.19.x
# carried as a wheel in .whl/): the tests that need a GPU and the single-GPU slow ones (the
# EPS-vs-stock equivalence over NCCL at EP=1 among them).
set -uo pipefail
OUT="${OUT:-/tmp/eps_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$OUT/versions.txt"
import torch, megatron.core, triton, numpy
print("device", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| megatron-core",
      megatron.core.__version__, "| triton", triton.__version__, "| numpy", numpy.__version__)
PY
python3 -m pytest -q -p no:cacheprovider tests -m "(gpu or slow) and not multigpu" --junitxml="$OUT/core_junit.xml" "$@" 2>&1 | tee "$OUT/core_pytest.log" | tail -40
