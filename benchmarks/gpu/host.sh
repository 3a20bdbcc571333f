# Sourced by benchmarks/gpu.sh host (one GPU, EP=1): the layer's host path against the stock
# + grouped baseline. Steps switched by env (1 = run):
#   TESTS  the tests marked gpu                                  -> host_pytest.log
#   TRACE  trace_layer_ops: EPS N=1 vs stock + grouped, by op and
#          by host function (TRACE_POINTS; hostpath is a layer of
#          microsecond GEMMs, whose forward time is its host path)  -> ops_vs_grouped.json / .txt
#   LAYER  bench_layer_multigpu at EP=1 with both baselines
#          (LAYER_MODELS, LAYER_TOKENS, MIXTRAL_TOKENS)           -> layer_ep1.json / .log
if [ "${TESTS:-1}" = "1" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests -m gpu 2>&1 \
    | grep -v "SyntaxWarning\|Evict LRU\|^$" > "$OUT/host_pytest.log"; tail -4 "$OUT/host_pytest.log"
fi
if [ "${TRACE:-1}" = "1" ]; then
  timeout "${TRACE_TIMEOUT:-200}" torchrun --standalone --nproc-per-node 1 benchmarks/trace_layer_ops.py \
    --out "$OUT/ops_vs_grouped.json" --points "${TRACE_POINTS:-hostpath:1024,dsv2lite:4096,dsv2:4096,mixtral:8192}" \
    --variants "grouped;pipeline_degree=1" --python-profile 40 --top 12 2>&1 | grep -v -i warn \
    > "$OUT/ops_vs_grouped.txt"; grep "==\|{'" "$OUT/ops_vs_grouped.txt" | grep -v "ops whose\|host functions"
fi
if [ "${LAYER:-1}" = "1" ]; then
  timeout "${LAYER_TIMEOUT:-240}" torchrun --standalone --nproc-per-node 1 benchmarks/bench_layer_multigpu.py \
    --out "$OUT/layer_ep1.json" --models "${LAYER_MODELS:-dsv2lite,dsv2,mixtral}" \
    --tokens "${LAYER_TOKENS:-4096,16384}" --mixtral-tokens "${MIXTRAL_TOKENS:-8192,16384}" \
    --degrees 1 --transports nccl --repeats "${LAYER_REPEATS:-15}" "$@" 2>&1 | grep -v -i warn \
    | grep -v '^{' > "$OUT/layer_ep1.log"; tail -12 "$OUT/layer_ep1.log"
fi
