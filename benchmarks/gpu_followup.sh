#!/usr/bin/env bash
# Second device call: (1) the prefill run with EPS's pipeline but Megatron's own expert module
# (expert_kernel=megatron), to separate kernel rounding from the pipeline in the logit check;
# (2) the pipeline benchmark (benchmarks/gpu_pipeline.sh) after the host-cost cuts.
set -uo pipefail
OUT="${OUT:-/tmp/eps_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT="$OUT" TIMEOUT=170 REPEATS=3 WARMUP=1 LAYERS=8 PROMPTS=2048,8192 \
  EXTRA_ARGS="--eps-expert-kernel megatron" JSON="$OUT/prefill_megatron_kernel.json" \
  bash benchmarks/gpu_prefill.sh 2>&1 | grep -v -i "warn" | tail -4
OUT="$OUT" PYTEST_TIMEOUT=60 BENCH_TIMEOUT=260 BENCH_BUDGET=210 EPS_GIT_COMMIT="${MEGATRON_EPS_GIT_COMMIT:-unknown}" \
  bash benchmarks/gpu_pipeline.sh 2>&1 | tail -45
