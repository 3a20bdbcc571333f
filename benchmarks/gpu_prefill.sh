#!/usr/bin/env bash
# EPS-MoE vs stock Megatron-Core MoE prefill on ONE GPU (EP=1), DeepSeek-V2-Lite shapes, bf16.
#
#   bash benchmarks/gpu_prefill.sh                      # writes $OUT/prefill_dsv2_lite_ep1.json
#   LAYERS=8 PROMPTS=2048,8192 bash benchmarks/gpu_prefill.sh
#
# Needs: one CUDA GPU, torch, megatron-core 0.16.x or 0.19.x (installed beforehand), pyyaml, tqdm.
# Random weights from a fixed seed; nothing is downloaded. Run from anywhere; paths are relative
# to the repository root. Targets (H100): EPS/stock prefill tokens/s >= 3x; bf16 logits relative
# L2 error <= 1e-2 (checked by the script: exit 1 if they disagree).
#
# Depth: how many DSV2-Lite layers fit 80 GB (bf16, 2 bytes/param; counts from
# ModelConfig.parameter_counts, printed below):
#   routed experts per MoE layer: 64 x 3 x 2048 x 1408 x 2 B = 1.11 GB; + MLA 0.03 GB + shared
#   experts 0.03 GB -> 1.17 GB per MoE layer; dense layer 1 0.16 GB; embedding + output 0.84 GB.
#   All 27 layers: 26 x 1.17 + 0.16 + 0.84 = 31.4 GB of weights. One model is resident at a time
#   (stock first; its weights are copied to host memory and loaded into the EPS model).
#   32K-token prefill adds: static KV cache 27 x 32768 x 16 x (192 + 128) x 2 B = 9.1 GB,
#   MoE activations at top-6 (196K routed rows x (2048 + 2816 + 1408 + 2048) x 2 B) ~ 3.3 GB,
#   attention (SDPA flash, O(s)) and the dense layer's FFN ~ 2 GB: ~46 GB peak < 80 GB.
#   So the full 27-layer model fits; LAYERS can lower it (first layer dense, the rest MoE).
# Prompt lengths 2K, 8K, 32K tokens, batch 1 (tokens/step = prompt length at EP=1).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/results}"
LAYERS="${LAYERS:-8}"
PROMPTS="${PROMPTS:-2048,8192,32768}"
BATCH="${BATCH:-1}"
REPEATS="${REPEATS:-5}"
WARMUP="${WARMUP:-2}"
ROUNDS="${ROUNDS:-2}"            # every mode built and timed ROUNDS times, alternating order
CONFIG="${CONFIG:-configs/deepseek_v2_lite.yaml}"
TIMEOUT="${TIMEOUT:-540}"          # the device allows 600 s per command
EXTRA_ARGS="${EXTRA_ARGS:-}"      # e.g. "--eps-pipeline-degree 4 --eps-expert-kernel grouped"
JSON="${JSON:-$OUT/prefill_dsv2_lite_ep1.json}"
REQUIRE_CUDA="${REQUIRE_CUDA:-1}"  # 0: allow a CPU smoke test (e.g. CONFIG=configs/tiny.yaml)
mkdir -p "$OUT"

# The device copy of the tree may have no .git: pass the commit in (lead: export it before).
COMMIT="${MEGATRON_EPS_GIT_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}"
export MEGATRON_EPS_GIT_COMMIT="$COMMIT"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<EOF
import torch, megatron_eps
from megatron_eps import compat
from megatron_eps.inference.model_config import load_model_config
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), megatron-core {compat.MCORE_VERSION}, "
      f"megatron-eps {megatron_eps.__version__}, commit $COMMIT")
assert torch.cuda.is_available() or "$REQUIRE_CUDA" == "0", "no CUDA device"
mc = load_model_config("$CONFIG", num_layers=$LAYERS)
c = mc.parameter_counts()
gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0
print(f"{mc.name}: {mc.num_layers} layers ({mc.num_moe_layers} MoE), weights "
      f"{c['total'] * 2 / 1e9:.1f} GB bf16 (MoE layer {c['moe_layer'] * 2 / 1e9:.2f} GB); "
      f"GPU {gib:.0f} GiB")
EOF

echo "== prefill: $CONFIG, $LAYERS layers, prompts $PROMPTS, batch $BATCH, EP=1"
timeout "$TIMEOUT" torchrun --standalone --nproc-per-node "${NPROC:-1}" examples/run_prefill.py \
  --config "$CONFIG" \
  --layers "$LAYERS" \
  --prompt-lengths "$PROMPTS" \
  --batch-size "$BATCH" \
  --dtype "${DTYPE:-bf16}" \
  --repeats "$REPEATS" \
  --warmup "$WARMUP" \
  --rounds "$ROUNDS" \
  --eps-moe \
  --no-progress \
  --git-commit "$COMMIT" \
  --json "$JSON" \
  $EXTRA_ARGS
rc=$?
echo "== exit code $rc (0 ok, 1 logits disagree, 2 a size ran out of memory, 124 timeout)"
if [ -f "$JSON" ]; then
  python - "$JSON" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"json: {sys.argv[1]}")
for row in r["results"]:
    s, e = row.get("stock", {}), row.get("eps", {})
    if "tokens_per_s" in s and "tokens_per_s" in e:
        err = row["logits"]["rel_l2_err"]
        print(f"L={row['prompt_length']:>6}: stock {s['tokens_per_s']:>10,.0f} tok/s  eps "
              f"{e['tokens_per_s']:>10,.0f} tok/s  speedup {row['speedup']:.2f}x "
              f"(target >= 3x: {'met' if row['speedup'] >= 3 else 'NOT met'})  "
              f"logit rel err {err:.2e} (<= 1e-2: {'ok' if err <= 1e-2 else 'NO'})  "
              f"experts {row.get('eps_expert_backends')}")
    else:
        print(f"L={row['prompt_length']:>6}: {s.get('error') or e.get('error')}")
EOF
fi
exit $rc
