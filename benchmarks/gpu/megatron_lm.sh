# Megatron-LM's own inference script with EPS, on one GPU (issue 29); sourced by benchmarks/gpu.sh.
#
#   bash benchmarks/gpu.sh megatron_lm
#
# Against the Megatron-LM checkout in $MEGATRON_LM_ROOT (default: the first of .mlm/core_r0.19.0,
# ../.mlm/core_r0.19.0, ../shared/megatron-lm/core_r0.19.0), first on PYTHONPATH, so its own
# megatron.core (0.19.1) is the one used (the JSON says which). The wheels megatron.training
# needs beyond the GPU image (six, regex, pydantic, psutil, pybind11, ...) are installed from
# .mlm/whl/ when present. Steps (MLM_STEPS, default all): the stock-path tests (CUDA-graph
# capture included), then benchmarks/megatron_lm_generation.py: checkpoints, fp32 and bf16
# generation through the unmodified examples/inference/advanced/gpt_static_inference.py
# (--use-legacy-static-engine), the decode-step benchmark, decode CUDA graphs, two ranks sharing
# the GPU at EP=2. -> $OUT/megatron_lm.json, $OUT/megatron_lm.log, $OUT/megatron_lm_tests.log
# The model's tokenizer (scripts/write_number_tokenizer.py, read through Megatron's
# HuggingFaceTokenizer) needs transformers and tokenizers from the GPU image.
MLM_ROOT="${MEGATRON_LM_ROOT:-}"
if [ -z "$MLM_ROOT" ]; then
  for candidate in .mlm/core_r0.19.0 ../.mlm/core_r0.19.0 ../shared/megatron-lm/core_r0.19.0; do
    if [ -d "$candidate/megatron/training" ]; then MLM_ROOT="$candidate"; break; fi
  done
fi
if [ -z "$MLM_ROOT" ] || [ ! -d "$MLM_ROOT/megatron/training" ]; then
  echo "megatron_lm.sh: no Megatron-LM checkout: set MEGATRON_LM_ROOT (looked in .mlm/, ../.mlm/, ../shared/megatron-lm/)" >&2
  exit 2
fi
MLM_ROOT="$(cd "$MLM_ROOT" && pwd)"
for wheel_dir in .mlm/whl ../.mlm/whl; do
  if ls "$wheel_dir"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/mlm_site "$wheel_dir"/*.whl 2>&1 | tail -2
    export PYTHONPATH="/tmp/mlm_site${PYTHONPATH:+:$PYTHONPATH}"
    break
  fi
done
if [ -n "${MLM_TESTS:-1}" ] && [ "${MLM_TESTS:-1}" != 0 ]; then
  timeout "${MLM_TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -rs \
    tests/integration/test_stock_path.py 2>&1 | grep -v -i "warn" | tee "$OUT/megatron_lm_tests.log" | tail -6
fi
timeout "${MLM_TIMEOUT:-480}" python3 benchmarks/megatron_lm_generation.py --megatron-lm "$MLM_ROOT" \
  --out "$OUT" --steps "${MLM_STEPS:-ckpt,fp32,bf16,decode,graphs,ep2}" \
  --timeout "${MLM_RUN_TIMEOUT:-150}" 2>&1 | tee "$OUT/megatron_lm.log" | grep -v "^\s*$" | tail -60
