#!/usr/bin/env bash
# The one GPU entry point (run through the device tool from the repository root, with the
# megatron-core wheel for the GPU machine's Python in .whl/):
#
#   bash benchmarks/gpu.sh SUBCOMMAND [args]
#
#   tests      pytest selected by marker: TEST_MARK (default "gpu or multigpu"), TEST_K, args
#   kernels    issue 11 on one GPU: kernel tests, Triton sweep, calibration, bench_experts,
#              self-calibration overhead (benchmarks/gpu/kernels.sh; steps switched by env)
#   transport  issue 15 on several GPUs of a node: tests, per-transport link calibration, the
#              layer benchmark with both baselines, soak, prefill (benchmarks/gpu/transport.sh)
#   multigpu   EP = #GPUs over NCCL: tests, link fit, layer and prefill (benchmarks/gpu/multigpu.sh)
#   pipeline   one GPU: the pipeline benchmark over the emulated link, trace, pipeline calibration
#   calibrate  megatron-eps-calibrate all (CAL_CONFIG, default deepseek_v2_lite; args passed on)
#              -> $OUT/<gpu>.json, then the chunks pipeline_degree auto picks from that file alone
#   prefill    benchmarks/gpu_prefill.sh (its env: LAYERS, PROMPTS, NPROC, EXTRA_ARGS, ...)
#   accuracy   benchmarks/accuracy_check.py (EPS and stock vs fp32, one DSV2-Lite layer)
#   diag       benchmarks/diag_overlap.py (host costs, carve-out, emulator fidelity)
#   layer      benchmarks/bench_layer_multigpu.py at EP = #GPUs (args passed on; LAYER_TIMEOUT)
#   split      benchmarks/chunk_split_tradeoff.py: expert vs token chunks (args passed on)
#   localrows  benchmarks/local_rows_tradeoff.py: a chunk's own rows apart, GEMMs measured and
#              the link modeled (args passed on)
#   shared     one GPU, two ranks on it over gloo: probe, multigpu tests, EP=2 prefill, soak
#              (benchmarks/gpu/shared.sh; functional only; steps switched by env)
#   host       one GPU: the layer's host path vs stock + grouped: tests, op and host-function
#              trace, layer benchmark at EP=1, traced prefill with PREFILL=1
#              (benchmarks/gpu/host.sh; steps switched by env)
#   roofline   one GPU, EP=1: the layer against the GPU's measured GEMM rate and copy bandwidth,
#              stock / stock + grouped / EPS, with a trace breakdown (benchmarks/gpu/roofline.sh)
#   megatron_lm  one GPU: Megatron-LM's unmodified gpt_static_inference.py, stock vs EPS through
#              python -m megatron_eps.launch (fp32/bf16, decode CUDA graphs, two ranks at EP=2),
#              and the decode-step benchmark (benchmarks/gpu/megatron_lm.sh; MEGATRON_LM_ROOT)
#
# Everything it writes goes under $OUT. MEGATRON_EPS_GIT_COMMIT names the commit of the tree
# (the device's copy has no .git). NVLink multicast stays off here and in every subprocess.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
COMMAND="${1:-help}"; shift || true
export OUT="${OUT:-/tmp/eps_out}"; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
export MEGATRON_EPS_GIT_COMMIT="${MEGATRON_EPS_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
case "$COMMAND" in
  help|-h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
  tests|kernels|transport|multigpu|pipeline|calibrate|prefill|accuracy|diag|layer|split|localrows|host|shared|roofline|megatron_lm) ;;
  *) echo "gpu.sh: unknown subcommand '$COMMAND'; allowed: tests, kernels, transport, multigpu," \
          "pipeline, calibrate, prefill, accuracy, diag, layer, split, localrows, host, shared, roofline," \
          "megatron_lm, help" >&2
     exit 2 ;;
esac
if ! python3 -c "import megatron.core" 2>/dev/null && ls .whl/megatron_core*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/megatron_core*.whl 2>/dev/null || { echo "gpu.sh: cannot install .whl/megatron_core*.whl"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
SLUG=$(python3 -c 'import torch; from megatron_eps.policy.kernel_tables import gpu_slug; print(gpu_slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)
export NGPU SLUG
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader 2>/dev/null \
  | tee "$OUT/gpu_state.txt" || true
case "$COMMAND" in
  tests)
    timeout "${TEST_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider -rs tests \
      -m "${TEST_MARK:-gpu or multigpu}" ${TEST_K:+-k "$TEST_K"} "$@" 2>&1 \
      | grep -v "SyntaxWarning\|Evict LRU\|^$" | tee "$OUT/gpu_pytest.log" | tail -40 ;;
  kernels|transport|multigpu|pipeline|host|shared|roofline|megatron_lm)
    . "benchmarks/gpu/$COMMAND.sh" "$@" ;;
  calibrate)
    timeout "${CAL_TIMEOUT:-300}" python3 -m megatron_eps.calibrate all --config "${CAL_CONFIG:-deepseek_v2_lite}" \
      --out "$OUT/" --no-progress "$@" 2>&1 | grep -v -i warn | tee "$OUT/calibrate_all.log" | tail -8
    python3 benchmarks/auto_from_profile.py "$OUT/$SLUG.json" --tokens 4096,16384,32768 2>&1 \
      | grep -v -i warn | tee "$OUT/auto_from_profile.txt" | tail -16 ;;
  prefill)
    bash benchmarks/gpu_prefill.sh "$@" ;;
  accuracy)
    timeout "${ACCURACY_TIMEOUT:-150}" python3 benchmarks/accuracy_check.py \
      --out "$OUT/accuracy_dsv2_lite_layer.json" "$@" 2>&1 | grep -v -i warn | tail -20 ;;
  diag)
    timeout "${DIAG_TIMEOUT:-400}" python3 benchmarks/diag_overlap.py --out "$OUT/diag.json" "$@" 2>&1 \
      | grep -v -i warn | tee "$OUT/diag.log" ;;
  layer)
    timeout "${LAYER_TIMEOUT:-400}" torchrun --standalone --nproc-per-node "$NGPU" \
      benchmarks/bench_layer_multigpu.py --out "$OUT/layer_ep$NGPU.json" "$@" 2>&1 \
      | grep -v -i warn | grep -v '^{' | tee "$OUT/layer_ep$NGPU.log" | tail -14 ;;
  split)
    timeout "${SPLIT_TIMEOUT:-400}" python3 benchmarks/chunk_split_tradeoff.py \
      --out "$OUT/chunk_split_tradeoff.json" "$@" 2>&1 | grep -v -i warn \
      | tee "$OUT/chunk_split_tradeoff.log" ;;
  localrows)
    timeout "${LOCALROWS_TIMEOUT:-400}" python3 benchmarks/local_rows_tradeoff.py \
      --out "$OUT/local_rows_tradeoff.json" "$@" 2>&1 | grep -v -i warn \
      | tee "$OUT/local_rows_tradeoff.log" ;;
esac
