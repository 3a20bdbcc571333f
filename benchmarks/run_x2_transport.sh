#!/usr/bin/env bash
# Issue 15 on nvidia-h200-x2 (one device call): transports' correctness at EP=2 over real links,
# then the layer benchmark (EPS per transport vs stock and vs stock + grouped GEMM) with traces.
#   TESTS=0 skips the tests; BENCH_ARGS adds benchmark flags.
set -uo pipefail
OUT="${OUT:-/tmp/eps_out}"; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/megatron_core*.whl 2>/dev/null
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export MEGATRON_EPS_GIT_COMMIT="${MEGATRON_EPS_GIT_COMMIT:-unknown}"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
python3 -c 'import torch, cuda.bindings; print("torch", torch.__version__, "cuda-bindings", cuda.bindings.__version__)'
if [ "${TESTS:-1}" = "1" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -x \
    tests/unit_tests/test_copy_engine_transport.py tests/unit_tests/test_eps_equivalence.py \
    -k "transport or bf16" 2>&1 | tee "$OUT/x2_pytest.log" | tail -15
fi
timeout "${BENCH_TIMEOUT:-330}" torchrun --standalone --nproc-per-node "$NGPU" benchmarks/bench_layer_multigpu.py \
  --out "$OUT/layer_x2.json" --trace-dir "$OUT/traces" ${BENCH_ARGS:-} 2>&1 | grep -v -i warn | grep -v '^{' | tee "$OUT/layer_x2.log" | tail -25
ls "$OUT/traces" 2>/dev/null | head
