"""The MoE layer against the GPU's limits on one GPU (EP=1): a roofline with a trace breakdown.

    python benchmarks/bench_roofline.py --out roofline.json [--trace-dir DIR]
    python benchmarks/bench_roofline.py --smoke --out x.json        (CPU: the logic, tiny shapes)

Per shape (DeepSeek-V2-Lite, DeepSeek-V2, Mixtral 8x7B, Qwen3-30B-A3B: the layer benchmark's
shapes, shared experts included where the model has them) and token count, with the routing a
random router gives random inputs:

* the layer's GEMM FLOPs (routed experts 6*T*k*H*F for a gated MLP, shared experts 6*T*H*Fs;
  the router's 2*T*H*E is listed apart and left out of the rate: under 0.5% everywhere);
* the fewest bytes it must move (every weight once, the input read and the output written once);
* the ceilings of this GPU, measured in the same run: the best dense bf16 GEMM rate (an 8192^3
  matmul, and the layer's own aspect: its routed FLOPs as one dense pair of GEMMs over all T*k
  rows, on data of the layer's scale) and the device-to-device copy bandwidth (bytes read +
  written);
* for stock (MoELayer, SequentialMLP), stock + grouped (the stock layer, its experts as one
  torch._grouped_mm per projection: inference.baselines) and EPS (EPSMoELayer, default settings,
  EP=1): the forward's time (CUDA events, median of ``--repeats`` samples in rotating order after
  a warm-up that leaves out the expert kernels' one-time self-calibration), and EPS with its
  rows planned on the device (``eps_device``: the same settings with ``plan_rows_on_device:
  on``, the same weights): the effective rate
  (GEMM FLOPs / time) and its share of the attainable rate;
* a breakdown of one profiled forward of each variant (torch.profiler, CPU and CUDA): each GPU
  kernel is assigned by the host range it was launched from (router, shared experts, experts;
  EPS's own phases) and by its name (GEMM or not) to router, permutation (all between routing
  and experts), expert GEMMs, activation (other kernels inside the experts), shared experts,
  combine (all after the experts), plus the GPU's idle time inside the forward (host gaps).
  ``expert_gemm_tflops`` is the routed FLOPs over the expert GEMM kernels' own time. The
  profiler slows the host, so the trace's idle time overstates a host-bound forward's;
  ``idle_of_timed_us`` (the timed forward less the GPU's busy time) is the idle as timed, and
  ``host_issue_us`` the host's time to issue one unprofiled forward.

The attainable rate is the larger of the two dense rates measured; its share is what the bars of
issue 30 are stated in. The floor time is max(FLOPs / attainable, bytes / copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from megatron_eps.timing import median_seconds

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_layer_multigpu import MODELS, SMOKE, rel_err, time_once  # noqa: E402

SHAPES = {
    "dsv2lite": MODELS["dsv2lite"],
    "dsv2": MODELS["dsv2"],
    "mixtral": MODELS["mixtral"],
    # Qwen3-30B-A3B: 128 experts of F768, top-8, hidden 2048, no shared experts.
    "qwen3": dict(hidden=2048, ffn=768, experts=128, topk=8, shared=None),
}
SMOKE_SHAPES = {
    "dsv2lite": SMOKE["dsv2lite"],
    "dsv2": SMOKE["dsv2"],
    "mixtral": SMOKE["mixtral"],
    "qwen3": dict(hidden=32, ffn=16, experts=16, topk=4, shared=None),
}
VARIANTS = ("stock", "grouped", "eps", "eps_device")
EPS_VARIANTS = ("eps", "eps_device")
CATEGORIES = ("router", "permutation", "expert_gemm", "activation", "shared_experts", "combine",
              "other", "idle")
# Kernels that are matrix products: cuBLAS (nvjet, *gemm*, xmma), CUTLASS (torch._grouped_mm),
# and the project's Triton grouped GEMM (_expert_gemm_*).
GEMM_KERNEL = re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|_grouped_mm", re.IGNORECASE)
# Host ranges (record_function) the breakdown reads: module hooks of this benchmark ("moe.*")
# and the EPS dispatcher's phases ("eps.*", with profiler_ranges on).
RANGE_CATEGORY = (
    ("moe.router", "router"),
    ("moe.shared_experts", "shared_experts"),
    ("eps.shared_experts", "shared_experts"),
    ("moe.experts", "experts"),
    ("eps.experts.prepare", "permutation"),  # the layer's staging of the expert offsets
    ("eps.experts", "experts"),
    ("eps.local_experts", "experts"),
    ("eps.place_rows", "permutation"),
    ("eps.dispatch", "permutation"),
    ("eps.counts", "permutation"),
    ("eps.layout", "permutation"),
    ("eps.choose", "permutation"),
    ("eps.transport", "permutation"),
    ("eps.combine", "combine"),
    ("eps.unpermute", "combine"),
)


# ---------------------------------------------------------------------------- the two numbers
def layer_flops(shape: dict, tokens: int) -> Dict[str, float]:
    """GEMM FLOPs of one forward: routed experts (gated: fc1 H -> 2F, fc2 F -> H), shared
    experts, router; ``total`` = routed + shared (what the rates count)."""
    h, f, k = shape["hidden"], shape["ffn"], shape["topk"]
    routed = 6.0 * tokens * k * h * f
    shared = 6.0 * tokens * h * shape["shared"] if shape.get("shared") else 0.0
    router = 2.0 * tokens * h * shape["experts"]
    return {"routed": routed, "shared": shared, "router": router, "total": routed + shared}


def min_bytes(shape: dict, tokens: int, element_size: int = 2) -> Dict[str, float]:
    """The fewest bytes a forward moves: each weight read once (routed experts, shared experts,
    router), the input read once and the output written once."""
    h, f = shape["hidden"], shape["ffn"]
    weights = (shape["experts"] * 3 * h * f + (3 * h * shape["shared"] if shape.get("shared") else 0)
               + shape["experts"] * h) * element_size
    activations = 2 * tokens * h * element_size
    return {"weights": float(weights), "activations": float(activations),
            "total": float(weights + activations)}


# ---------------------------------------------------------------------------- ceilings
def dense_gemm_tflops(m: int, k: int, n: int, device, dtype, repeats: int,
                      weight_scale: float = 1.0, sets: int = 3) -> float:
    """TFLOP/s of ``[m, k] @ [k, n]`` (randn activations, randn * weight_scale weights), the
    inputs rotated over ``sets`` copies so repeated runs do not read them from L2."""
    gen = torch.Generator(device="cpu").manual_seed(7)
    a = [torch.randn(m, k, generator=gen).to(device, dtype) for _ in range(sets)]
    b = [(torch.randn(k, n, generator=gen) * weight_scale).to(device, dtype) for _ in range(sets)]
    state = {"i": 0}

    def step():
        i = state["i"] = (state["i"] + 1) % sets
        torch.matmul(a[i], b[i])

    seconds = median_seconds(step, device, repeats)
    return 2.0 * m * k * n / seconds / 1e12


def aspect_pair_tflops(shape: dict, tokens: int, device, dtype, repeats: int) -> float:
    """TFLOP/s of the layer's routed FLOPs as one dense pair of GEMMs over all T*k rows (fc1
    [M, H] @ [H, 2F], fc2 [M, F] @ [F, H]), weights of the layer's scale (std 0.02)."""
    m, h, f = tokens * shape["topk"], shape["hidden"], shape["ffn"]
    gen = torch.Generator(device="cpu").manual_seed(11)
    x = torch.randn(m, h, generator=gen).to(device, dtype)
    w1 = (torch.randn(h, 2 * f, generator=gen) * 0.02).to(device, dtype)
    mid = torch.randn(m, f, generator=gen).to(device, dtype)
    w2 = (torch.randn(f, h, generator=gen) * 0.02).to(device, dtype)

    def step():
        torch.matmul(x, w1)
        torch.matmul(mid, w2)

    seconds = median_seconds(step, device, repeats)
    del x, w1, mid, w2
    return 6.0 * m * h * f / seconds / 1e12


def copy_gbps(device, nbytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth, bytes read + bytes written per second (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2.0 * nbytes / seconds / 1e9


# ---------------------------------------------------------------------------- breakdown
class ModuleRanges:
    """Profiler ranges (``moe.router``, ``moe.shared_experts``, ``moe.experts``) around a MoE
    layer's submodules, for the breakdown to attribute kernels by where they were launched."""

    def __init__(self, layer):
        self.handles = []
        for name in ("router", "shared_experts", "experts"):
            module = getattr(layer, name, None)
            if isinstance(module, torch.nn.Module):
                self._wrap(module, f"moe.{name}")

    def _wrap(self, module, label):
        open_ranges = []

        def pre(_module, _inputs):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            open_ranges.append(rf)

        def post(_module, _inputs, _output):
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _range_category(name: str) -> Optional[str]:
    for prefix, category in RANGE_CATEGORY:
        if name.startswith(prefix):
            return category
    return None


def breakdown_from_trace(events: List[dict]) -> Dict:
    """Where one forward's GPU time goes, from a torch.profiler Chrome trace's events.

    Each GPU kernel / memcpy / memset is matched (by correlation id) to the host call that
    launched it; the innermost known host range around that call gives its place (router,
    shared experts, experts, an EPS phase). Inside the experts, matrix-product kernels are
    ``expert_gemm`` and the rest ``activation``; outside any known range, a kernel launched
    before the first expert kernel is ``permutation`` and one after the last is ``combine``.
    ``idle`` is the span from the first kernel's start to the last kernel's end less the time
    some kernel ran. Times in microseconds."""
    from trace_overlap import length, union

    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in complete if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        raise ValueError("no GPU kernels in the trace (was CUDA activity profiled?)")
    launches = {e["args"]["correlation"]: e["ts"] for e in complete
                if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    ranges = sorted(((e["ts"], e["ts"] + e["dur"], cat) for e in complete
                     if e.get("cat") == "user_annotation"
                     for cat in [_range_category(e["name"])] if cat), key=lambda r: r[0])

    def place(launch_ts):
        inside = [r for r in ranges if r[0] <= launch_ts <= r[1]]
        return min(inside, key=lambda r: r[1] - r[0])[2] if inside else None

    placed = []
    for e in gpu:
        launch_ts = launches.get(e.get("args", {}).get("correlation"))
        where = place(launch_ts) if launch_ts is not None else None
        placed.append((e, launch_ts, where))
    expert_launches = [ts for _, ts, where in placed if where == "experts" and ts is not None]
    first_expert, last_expert = (min(expert_launches), max(expert_launches)) if expert_launches \
        else (None, None)
    totals = {c: 0.0 for c in CATEGORIES}
    for e, launch_ts, where in placed:
        if where == "experts":
            category = "expert_gemm" if GEMM_KERNEL.search(e["name"]) else "activation"
        elif where is not None:
            category = where
        elif launch_ts is not None and first_expert is not None and launch_ts < first_expert:
            category = "permutation"
        elif launch_ts is not None and last_expert is not None and launch_ts > last_expert:
            category = "combine"
        else:
            category = "other"
        totals[category] += e["dur"]
    busy = union((e["ts"], e["ts"] + e["dur"]) for e in gpu)
    span = busy[-1][1] - busy[0][0]
    totals["idle"] = span - length(busy)
    return {"span_us": round(span, 1), "busy_us": round(length(busy), 1),
            "gpu_ops": len(gpu), "us": {c: round(v, 1) for c, v in totals.items()}}


def profile_forward(layer, x, trace_path: str, eps: bool) -> Dict:
    """One profiled forward of ``layer`` (after one unprofiled one): its breakdown."""
    ranges = ModuleRanges(layer)
    dispatcher = getattr(layer, "token_dispatcher", None)
    if eps:
        dispatcher.profiler_ranges = True
    cuda = x.is_cuda
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        sync()
        t0 = time.perf_counter()
        layer(x)
        host_s = time.perf_counter() - t0  # the host's time to issue the forward
        sync()
        with torch.profiler.profile(activities=activities) as prof:
            layer(x)
            sync()
    finally:
        ranges.remove()
        if eps:
            dispatcher.profiler_ranges = False
    os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
    prof.export_chrome_trace(trace_path)
    with open(trace_path) as f:
        data = json.load(f)
    result = breakdown_from_trace(data["traceEvents"] if isinstance(data, dict) else data)
    result["host_issue_us"] = round(host_s * 1e6, 1)
    return result


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="dsv2lite,dsv2,mixtral,qwen3",
                    help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--tokens", default="4096,16384,32768")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--back-to-back", type=int, default=4, metavar="K",
                    help="also time K forwards issued back to back per sample, as a model's MoE "
                         "layers follow each other (a host that never waits for the GPU runs "
                         "ahead into the next one); 0: only single forwards. Default: 4")
    ap.add_argument("--trace-dir", default=None,
                    help="profile one forward of every variant at every point, keep the traces "
                         "here and add the breakdown (GPU kernels: CUDA only)")
    ap.add_argument("--eps", default="",
                    help="EPSConfig overrides for the EPS variant, e.g. pipeline_degree=1")
    ap.add_argument("--eps-shared-stream", default="side", choices=("side", "same"),
                    help="where the EPS layer issues its shared experts: a side stream of their "
                         "own, joined before the combine (side, the layer's default where no "
                         "link is used, as here), or the compute stream in issue order (same)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (logic check)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be an integer >= 1")
    if args.back_to_back < 0:
        ap.error(f"--back-to-back {args.back_to_back}: must be an integer >= 0")
    for flag, given, allowed in (("--models", args.models, tuple(SHAPES)),
                                 ("--variants", args.variants, VARIANTS)):
        bad = [v for v in given.split(",") if v not in allowed]
        if bad or not given:
            ap.error(f"{flag} {given!r}: allowed values (comma list): {', '.join(allowed)}")
    try:
        args.token_counts = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        args.token_counts = []
    if not args.token_counts or min(args.token_counts) < 1:
        ap.error(f"--tokens {args.tokens!r}: a comma list of integers >= 1")
    return args


def eps_settings(text: str):
    """'a=1,b=x' -> EPSConfig(min_tokens_to_pipeline=0, a=1, b='x'); SystemExit naming the
    setting on a bad one."""
    from megatron_eps.config import EPSConfig, EPSConfigError

    overrides = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = int(value) if value.isdigit() else value
    try:
        return EPSConfig(**{"min_tokens_to_pipeline": 0, **overrides})
    except (EPSConfigError, TypeError, ValueError) as exc:
        raise SystemExit(f"--eps {text!r}: {exc}") from None


def eps_twin(stock, shape, dtype, eps_config):
    """An EPSMoELayer with ``stock``'s weights and ``eps_config`` but its rows planned on the
    device (``plan_rows_on_device: on``), for timing the two plans in one run."""
    import dataclasses

    from bench_layer_multigpu import layer_config
    from megatron_eps.inference.layers import build_moe_pair

    _, twin = build_moe_pair(layer_config(shape, 1, dtype),
                             dataclasses.replace(eps_config, plan_rows_on_device="on"))
    twin.load_state_dict(stock.state_dict())
    return twin


def main(argv=None):
    args = parse_args(argv)
    eps_config = eps_settings(args.eps)
    from bench_layer_multigpu import layer_config, start_expert_group
    from megatron_eps.provenance import provenance, write_result
    from megatron_eps.experts.autotune import warm_up_while_calibrating
    from megatron_eps.testing import Utils
    from megatron_eps.inference.baselines import with_grouped_experts
    from megatron_eps.inference.layers import build_moe_pair

    cuda, world, _rank, dtype, _ = start_expert_group(args.smoke)
    if world != 1:
        raise SystemExit("bench_roofline.py runs on one process (EP=1); start it without torchrun "
                         "or with --nproc-per-node 1")
    device = torch.device("cuda" if cuda else "cpu")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    token_counts = [64, 128] if args.smoke else args.token_counts
    variants = args.variants.split(",")
    big = 256 if args.smoke else 8192
    ceilings = {
        "dense_8192_randn_tflops": dense_gemm_tflops(big, big, big, device, dtype, args.repeats),
        "dense_8192_layer_scale_tflops": dense_gemm_tflops(big, big, big, device, dtype,
                                                           args.repeats, weight_scale=0.02),
        "copy_gbps": copy_gbps(device, (1 << 20) if args.smoke else (1 << 30), args.repeats),
    }
    print(f"ceilings: {json.dumps({k: round(v, 1) for k, v in ceilings.items()})}", flush=True)
    rows = []
    for name in args.models.split(","):
        shape = shapes[name]
        stock, eps_layer = build_moe_pair(layer_config(shape, 1, dtype), eps_config)
        layers = {"stock": stock, "grouped": with_grouped_experts(stock), "eps": eps_layer}
        if "eps_device" in variants:
            layers["eps_device"] = eps_twin(stock, shape, dtype, eps_config)
        for v in EPS_VARIANTS:
            if v in layers:
                layers[v].shared_experts_side_stream = args.eps_shared_stream == "side"
        for tokens in token_counts:
            gen = torch.Generator().manual_seed(1000)
            x = torch.randn(tokens, 1, shape["hidden"], generator=gen).to(device, dtype)
            flops, nbytes = layer_flops(shape, tokens), min_bytes(shape, tokens)
            aspect = aspect_pair_tflops(shape, tokens, device, dtype, args.repeats)
            attainable = max(aspect, ceilings["dense_8192_layer_scale_tflops"],
                             ceilings["dense_8192_randn_tflops"])
            compute_s = flops["total"] / (attainable * 1e12)
            memory_s = nbytes["total"] / (ceilings["copy_gbps"] * 1e9)
            row = {"model": name, "shape": shape, "tokens": tokens, "flops": flops,
                   "min_bytes": nbytes, "aspect_pair_tflops": aspect,
                   "attainable_tflops": attainable,
                   "floor_ms": {"compute": compute_s * 1e3, "memory": memory_s * 1e3,
                                "floor": max(compute_s, memory_s) * 1e3},
                   "ms": {}, "tflops": {}, "share_of_attainable": {}, "rel_err_vs_stock": {},
                   "samples_ms": {v: [] for v in variants}}
            if args.back_to_back:
                row.update({"back_to_back_forwards": args.back_to_back,
                            "back_to_back_samples_ms": {v: [] for v in variants},
                            "back_to_back_ms": {}, "back_to_back_share_of_attainable": {}})
            with torch.no_grad():
                # Stock's output is the reference (its forward runs even when not timed).
                reference = time_once(stock, x, cuda)[1]
                for v in variants:
                    layer = layers[v]
                    last = [time_once(layer, x, cuda)[1]]
                    # The expert kernels' one-time self-calibration stays out of the samples.
                    warm_up_while_calibrating(
                        lambda: last.__setitem__(0, time_once(layer, x, cuda)[1]), device)
                    row["rel_err_vs_stock"][v] = rel_err(reference, last[0])
                del reference
                for round_ in range(args.repeats):
                    order = variants[round_ % len(variants):] + variants[:round_ % len(variants)]
                    for v in order:
                        row["samples_ms"][v].append(time_once(layers[v], x, cuda)[0] * 1e3)
                        if args.back_to_back:
                            row["back_to_back_samples_ms"][v].append(
                                time_once(layers[v], x, cuda, args.back_to_back)[0] * 1e3)
                for v in variants:
                    ms = statistics.median(row["samples_ms"][v])
                    row["ms"][v] = ms
                    row["tflops"][v] = flops["total"] / (ms * 1e-3) / 1e12
                    row["share_of_attainable"][v] = row["tflops"][v] / attainable
                    if args.back_to_back:
                        ms = statistics.median(row["back_to_back_samples_ms"][v])
                        row["back_to_back_ms"][v] = ms
                        row["back_to_back_share_of_attainable"][v] = (
                            flops["total"] / (ms * 1e-3) / 1e12 / attainable)
                if "eps" in variants:
                    record = eps_layer.token_dispatcher.last_record
                    row["eps_chunks"] = list(record.experts_per_chunk) if record else []
                    row["eps_backends"] = list(eps_layer.expert_runner.backends_used)
                if "eps_device" in variants:
                    record = layers["eps_device"].token_dispatcher.last_record
                    row["eps_device_planned_on_device"] = bool(
                        record is not None and record.device_counts is not None)
                    row["eps_device_backends"] = list(
                        layers["eps_device"].expert_runner.backends_used)
                if args.trace_dir:  # on the CPU (smoke) the breakdown records its error
                    row["breakdown"] = {}
                    for v in variants:
                        path = os.path.join(args.trace_dir, f"roofline_{name}_{tokens}_{v}.json")
                        try:
                            bd = profile_forward(layers[v], x, path, v in EPS_VARIANTS)
                        except Exception as exc:  # noqa: BLE001 - the timings still count
                            row["breakdown"][v] = {"error": f"{type(exc).__name__}: {exc}"}
                            continue
                        # The profiler slows the host, so idle inside the traced forward
                        # overstates a host-bound forward's: the timed forward less the GPU's
                        # busy time is the idle of the forward as timed.
                        bd["idle_of_timed_us"] = round(max(0.0, row["ms"][v] * 1e3 - bd["busy_us"]), 1)
                        row["breakdown"][v] = bd
                        bd["expert_gemm_tflops"] = (flops["routed"] / (bd["us"]["expert_gemm"] * 1e-6)
                                                    / 1e12 if bd["us"]["expert_gemm"] else None)
            rows.append(row)
            print_row(row, variants)
            del x
        del stock, eps_layer, layers
        if cuda:
            torch.cuda.empty_cache()
    result = provenance(torch.cuda.get_device_name(0) if cuda else "cpu (smoke)",
                        ceilings=ceilings, eps_settings=args.eps or "defaults",
                        eps_shared_stream=args.eps_shared_stream,
                        timing=f"CUDA events around one forward, median of {args.repeats} "
                               "samples in rotating order after a warm-up that leaves out the "
                               "kernels' self-calibration; one process, EP=1; back_to_back_*: "
                               f"{args.back_to_back} forwards issued back to back per sample "
                               "(time per forward)",
                        rows=rows)
    write_result(args.out, result)
    print_table(result, variants)
    Utils.destroy_model_parallel()


def print_row(row, variants):
    parts = [f"{v} {row['ms'][v]:.3f} ms {row['tflops'][v]:.0f} TF/s" for v in variants]
    if "back_to_back_ms" in row:
        parts += [f"back to back: {v} {row['back_to_back_ms'][v]:.3f} ms "
                  f"{100 * row['back_to_back_share_of_attainable'][v]:.0f}%" for v in variants]
    print(f"{row['model']} {row['tokens']}: " + ", ".join(parts), flush=True)


def print_table(result, variants):
    rows = result["rows"]
    c = result["ceilings"]
    print(f"\n== roofline on {result['device']}: dense 8192^3 {c['dense_8192_randn_tflops']:.0f} TF/s "
          f"(randn) / {c['dense_8192_layer_scale_tflops']:.0f} (weights std 0.02), copy "
          f"{c['copy_gbps']:.0f} GB/s")
    head = f"{'model':9}{'tokens':>7}{'GFLOP':>8}{'min MB':>8}{'attain':>7}{'floor ms':>9}"
    for v in variants:
        head += f" | {v:>7} ms  TF/s   %"
    ratios = [v for v in EPS_VARIANTS if {v, "grouped"} <= set(variants)]
    print(head + "".join(f" | {v}/grp" for v in ratios))
    for r in rows:
        line = (f"{r['model']:9}{r['tokens']:>7}{r['flops']['total'] / 1e9:>8.0f}"
                f"{r['min_bytes']['total'] / 1e6:>8.0f}{r['attainable_tflops']:>7.0f}"
                f"{r['floor_ms']['floor']:>9.3f}")
        for v in variants:
            line += (f" | {r['ms'][v]:>10.3f} {r['tflops'][v]:>5.0f}"
                     f" {100 * r['share_of_attainable'][v]:>3.0f}")
        for v in ratios:
            line += f" | {r['ms']['grouped'] / r['ms'][v]:>{len(v) + 2}.2f}x"
        print(line)
    if any("back_to_back_ms" in r for r in rows):
        print(f"\n== {rows[0]['back_to_back_forwards']} forwards back to back: ms per forward "
              "(share of the attainable rate)")
        for r in rows:
            if "back_to_back_ms" not in r:
                continue
            line = f"{r['model']:9}{r['tokens']:>7}"
            for v in variants:
                line += (f" | {v} {r['back_to_back_ms'][v]:>8.3f}"
                         f" {100 * r['back_to_back_share_of_attainable'][v]:>3.0f}%")
            for v in EPS_VARIANTS:
                if {v, "grouped"} <= set(variants):
                    line += f" | {v}/grp {r['back_to_back_ms']['grouped'] / r['back_to_back_ms'][v]:.2f}x"
            print(line)
    if any("breakdown" in r for r in rows):
        print("\n== breakdown of one profiled forward (GPU us by where the kernel was launched; "
              "idle = GPU idle inside the forward)")
        print(f"{'model':9}{'tokens':>7} {'variant':8}{'span':>8}" +
              "".join(f"{c[:8]:>9}" for c in CATEGORIES) + f"{'GEMM TF/s':>10}{'host':>8}{'timed':>8}{'idle(t)':>8}")
        for r in rows:
            for v, bd in r.get("breakdown", {}).items():
                if "error" in bd:
                    print(f"{r['model']:9}{r['tokens']:>7} {v:8} {bd['error']}")
                    continue
                rate = bd.get("expert_gemm_tflops")
                print(f"{r['model']:9}{r['tokens']:>7} {v:8}{bd['span_us']:>8.0f}" +
                      "".join(f"{bd['us'][c]:>9.0f}" for c in CATEGORIES) +
                      (f"{rate:>10.0f}" if rate else f"{'-':>10}") + f"{bd['host_issue_us']:>8.0f}"
                      f"{r['ms'][v] * 1e3:>8.0f}{bd['idle_of_timed_us']:>8.0f}")


if __name__ == "__main__":
    main()
