#!/usr/bin/env bash
# Third device call: accuracy of EPS and stock against fp32 (one DSV2-Lite MoE layer), then the
# end-to-end prefill benchmark (DSV2-Lite, 8 layers, EP=1) after the fp32 per-token combine.
set -uo pipefail
OUT="${OUT:-/tmp/eps_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
timeout 150 python3 benchmarks/accuracy_check.py --out "$OUT/accuracy_dsv2_lite_layer.json" 2>&1 | grep '^{'
OUT="$OUT" TIMEOUT=300 REPEATS=5 WARMUP=1 LAYERS=8 bash benchmarks/gpu_prefill.sh 2>&1 | grep -v -i "warn" | tail -5
