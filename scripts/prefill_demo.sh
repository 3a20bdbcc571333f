#!/usr/bin/env bash
# The main job: prefill benchmark of a small MoE GPT model, stock Megatron vs EPS.
# CPU: 2 gloo ranks with configs/tiny.yaml. GPUs: one rank per GPU (NCCL). Extra args go to
# run_prefill.py (e.g. --config configs/deepseek_v2_lite.yaml --layers 4).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
set -euo pipefail
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
else
  NPROC="${NPROC:-2}"
fi
# Check every setting once, in one process, before torchrun starts the ranks: a bad value ends
# with one line naming it, before any process group or benchmark.
case " $* " in *" -h "*|*" --help "*) exec python examples/run_prefill.py --help ;; esac
WORLD_SIZE="$NPROC" python examples/run_prefill.py --validate-only "$@" >/dev/null
exec torchrun --standalone --nproc-per-node "$NPROC" examples/run_prefill.py "$@"
