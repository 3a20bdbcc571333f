# Sourced by benchmarks/gpu.sh multigpu (EP = #GPUs over NCCL):
# Writes under $OUT (megatron-core carried as a wheel in .whl/; NCCL multicast off):
#   1. EPS-vs-stock equivalence tests at EP = 2 and 4 (and every world size <= #GPUs) over NCCL
#   2. the real all-to-all link: latency/bandwidth fit, merged into a copy of the pipeline profile
#   3. one MoE layer over real NCCL: stock vs EPS (N fixed, auto), DSV2 and Mixtral shapes
#   4. the prefill benchmark at EP = #GPUs, stock vs --eps-moe
echo "== $NGPU GPUs"; nvidia-smi topo -m 2>/dev/null | head -12
timeout 300 python3 -m pytest -q -p no:cacheprovider tests -m multigpu -k "not fp32" 2>&1 | tee "$OUT/multigpu_pytest.log" | tail -5
PROFILE="$OUT/$SLUG.ep$NGPU.json"
cp "megatron_eps/profiles/$SLUG.json" "$PROFILE" 2>/dev/null || cp megatron_eps/profiles/nvidia_h100_80gb_hbm3.json "$PROFILE"
timeout 120 torchrun --standalone --nproc-per-node "$NGPU" -m megatron_eps.calibrate link \
  --out "$PROFILE" 2>&1 | grep -v -i warn | tail -4
timeout 200 torchrun --standalone --nproc-per-node "$NGPU" benchmarks/bench_layer_multigpu.py \
  --out "$OUT/layer_ep$NGPU.json" --repeats 8 2>&1 | grep -v -i warn | grep -v '^{' | tail -12
OUT="$OUT" NPROC="$NGPU" TIMEOUT=150 LAYERS=4 PROMPTS=4096,16384 REPEATS=3 ROUNDS=1 \
  EXTRA_ARGS="--eps-cost-profile $PROFILE" JSON="$OUT/prefill_ep$NGPU.json" \
  bash benchmarks/gpu_prefill.sh 2>&1 | grep -v -i warn | tail -4
