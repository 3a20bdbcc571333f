"""Pipeline benchmark: one EPS MoE layer under an emulated link, sequential vs N chunks vs auto.

One GPU emulates rank 0 of an EP group: the layer runs with ep_size 1 (all experts of the rank
local) and its all-to-alls go through ``EmulatedLinkAllToAll``, which copies the rows and then
spins the comm stream for ``remote bytes / bandwidth + latency`` (remote = (G-1)/G of the
bytes for EP=G, with balanced routing). See docs/pipeline.md.

Shapes (bf16): DSV2 at EP=8 (H 5120, 20 local experts of F 1536, top-6, shared F 3072) and
Mixtral 8x7B at EP=2 (H 4096, 4 local experts of F 14336, top-2). Per point:

  T_comp   the layer with no link at all (N=1)
  T_comm   the link alone: the emulator calls of the N=1 layer, back to back
  T_seq    N=1, everything on one stream (overlap off)
  T_N      N chunks, overlap on (comm stream), for each N of the sweep
  T_auto   pipeline_degree="auto" from a profile calibrated at the start of this run
  eta      (T_seq - T_eps) / min(T_comm, T_comp), T_eps = best T_N

Calibration (first): cycles/ms of torch.cuda._sleep, device copy bandwidth, expert GEMM TFLOP/s,
and the per-chunk overhead k (and b): slope of T(N) with overlap off and a free link.

Run: python benchmarks/bench_pipeline.py --out results.json [--trace trace.json] ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

MODELS = {
    # name: (hidden, ffn, local experts, topk, shared ffn, ep size emulated)
    "dsv2": dict(hidden=5120, ffn=1536, experts=20, topk=6, shared=3072, ep=8),
    "mixtral": dict(hidden=4096, ffn=14336, experts=4, topk=2, shared=None, ep=2),
}
DEGREES = {"dsv2": [1, 2, 3, 4, 5, 8, 10, 16], "mixtral": [1, 2, 3, 4]}
# N of the tail split (last chunk one expert) measured beside the equal ones.
TAIL_DEGREES = {"dsv2": [3, 4, 5, 6, 8], "mixtral": [2, 3]}
DEVICE = "cuda"


def shrink_for_smoke():
    """--smoke: tiny shapes on CPU (logic check of this script only; no numbers)."""
    global DEVICE
    from megatron_eps.testing import install_cpu_shims

    install_cpu_shims()
    DEVICE = "cpu"
    for m in MODELS.values():
        m.update(hidden=64, ffn=32, shared=48 if m["shared"] else None)


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------- timing
def time_ms(fn, warmup=3, repeats=10):
    """Median of ``repeats`` CUDA-event timings of fn() (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples), samples


# ----------------------------------------------------------------------------- setup
def init_megatron():
    from megatron_eps.testing import Utils

    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
    Utils.initialize_model_parallel(1, 1, expert_model_parallel_size=1)


def pick_kernel(requested):
    if requested != "auto-pick":
        return requested
    try:
        import megatron_eps.experts.grouped  # noqa: F401

        return "grouped"
    except ImportError:
        return "megatron"


def build_layer(model, kernel, with_stock=False):
    from megatron_eps import EPSConfig
    from megatron_eps.inference.layers import build_moe_pair, moe_config

    m = MODELS[model]
    config = moe_config(
        num_experts=m["experts"], topk=m["topk"], hidden_size=m["hidden"], ffn_hidden_size=m["ffn"],
        shared_expert_size=m["shared"], dtype=torch.bfloat16,
    )
    eps_config = EPSConfig(pipeline_degree=1, min_tokens_to_pipeline=0, expert_kernel=kernel)
    stock, eps = build_moe_pair(config, eps_config, seed=1)
    if not with_stock:
        del stock
        torch.cuda.empty_cache()
        stock = None
    return stock, eps


_PROFILES = {}


def set_mode(eps, degree, link, overlap=True, profile_path=None, dispatch_ahead=None, split="equal",
             carveout=None):
    """Configure the layer for one measurement.

    ``degree``: N (``split`` "equal" or "tail") or "auto". With ``profile_path`` the layer chooses
    the chunks with degree.choose_chunking under that (emulated-link) profile, exactly as
    EPSMoELayer.chunking_policy does, but without routing the file through
    eps_config.cost_profile (which the expert-kernel selector reads too). "auto" keeps the
    default enable threshold (min_tokens_to_pipeline) and chunk_split="auto", as a user gets
    them; fixed degrees pipeline at every load.
    """
    from megatron_eps import EPSConfig
    from megatron_eps.bench.emulated_group import emulated_group_counts, emulated_group_shape
    from megatron_eps.policy.cost_model import LayerShape
    from megatron_eps.policy.degree import choose_chunking
    from megatron_eps.policy.profile import PipelineProfile

    eps.eps_config.pipeline_degree = degree
    defaults = EPSConfig()
    eps.eps_config.min_tokens_to_pipeline = defaults.min_tokens_to_pipeline if degree == "auto" else 0
    eps.eps_config.chunk_split = defaults.chunk_split if degree == "auto" else split
    eps.eps_config.gemm_sm_carveout = carveout
    if profile_path is not None:
        if profile_path not in _PROFILES:
            with open(profile_path) as f:
                group = json.load(f)["emulated_group"]
            _PROFILES[profile_path] = PipelineProfile.from_json(profile_path), group
        prof, group = _PROFILES[profile_path]

        class EmulatedLinkChunking:
            """The layer's chunking under the emulated-link profile."""

            shape = LayerShape.from_megatron(eps.config, eps.num_local_experts,
                                             eps.token_dispatcher.ep_size, 2)  # bf16

            def choose(self, counts, transport=None):
                return choose_chunking(emulated_group_counts(counts, group),
                                       emulated_group_shape(self.shape, group), eps.eps_config, prof,
                                       dispatch_ahead=eps.token_dispatcher.dispatch_ahead)

        eps.use_chunking(EmulatedLinkChunking())
    else:
        eps.use_chunking(None)
    from megatron_eps.comm.nccl import NCCLTransport

    eps.use_transport(NCCLTransport(link))
    eps.token_dispatcher.overlap = overlap
    eps.token_dispatcher.dispatch_ahead = dispatch_ahead


def make_input(model, tokens, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(tokens, 1, MODELS[model]["hidden"], device=DEVICE, dtype=torch.bfloat16, generator=g)


# ----------------------------------------------------------------------------- calibration
def measure_copy_gbps():
    n = 1 << 29 if DEVICE == "cuda" else 1 << 16  # 1 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    b = torch.empty_like(a)
    ms, _ = time_ms(lambda: b.copy_(a), warmup=2, repeats=10)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / (ms * 1e-3) / 1e9  # read + write


def measure_expert_tflops(eps, model, tokens):
    """Balanced load through the chosen backend, all local experts in one call."""
    from megatron_eps.experts.base import get_backend

    m = MODELS[model]
    rows = tokens * m["topk"]
    tpe = [rows // m["experts"]] * m["experts"]
    rows = sum(tpe)
    x = torch.randn(rows, m["hidden"], device=DEVICE, dtype=torch.bfloat16)
    probs = torch.rand(rows, device=DEVICE, dtype=torch.float32)
    local = eps.expert_runner.local_experts
    name = eps.eps_config.expert_kernel
    backend = get_backend(name)
    ms, _ = time_ms(lambda: backend.forward(local, x, tpe, probs, 0))
    flops = rows * 2.0 * m["hidden"] * (3 * m["ffn"])
    return flops / (ms * 1e-3) / 1e12, ms


def fit_line(xs, ys):
    """Theil-Sen line (median of the pairwise slopes): one noisy timing cannot swing it."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
              if xs[j] != xs[i]]
    slope = float(np.median(slopes))
    intercept = float(np.median(ys - slope * xs))
    return slope, intercept


def interleaved_ms(setters, x, eps, rounds=3, repeats=10):
    """Median time of each configuration, measured in ``rounds`` alternating passes (the order
    rotates each round), so that a slow spell of the shared machine hits every configuration
    alike."""
    names = list(setters)
    samples = {name: [] for name in names}
    with torch.no_grad():
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no fixed slot
                setters[name]()
                _, ms = time_ms(lambda: eps(x), warmup=2, repeats=repeats)
                samples[name].extend(ms)
    return {name: statistics.median(v) for name, v in samples.items()}


def measure_chunk_overhead(eps, model, tokens, free_link, repeats):
    """T(N) with overlap off and a free link: k = slope (ms per chunk), b from N=1's residual."""
    x = make_input(model, tokens, seed=1)
    degrees = [n for n in DEGREES[model]]
    times = []
    with torch.no_grad():
        for n in degrees:
            set_mode(eps, n, free_link, overlap=False)
            ms, _ = time_ms(lambda: eps(x), repeats=repeats)
            times.append(ms)
    slope, intercept = fit_line(degrees, times)
    return {"tokens": tokens, "degrees": degrees, "ms": times, "k_us": slope * 1e3,
            "intercept_ms": intercept}


# ----------------------------------------------------------------------------- profiles
def write_profile(path, *, bandwidth, latency, k_us, b_us, tflops, mem_gbps, fraction, provenance,
                  overlap_efficiency=1.0, host_us=0.0, sm_count=None, host_base_us=0.0, min_gain=0.0):
    """A profile of the emulated link (this benchmark's own; the GPU's profile is written by
    megatron-eps-calibrate)."""
    from megatron_eps.policy.profile import PipelineProfile

    profile = PipelineProfile(
        link_bandwidth_gbps=bandwidth, link_latency_us=latency, chunk_overhead_us=max(k_us, 0.0),
        expert_tflops=tflops, chunk_overhead_base_us=max(b_us, 0.0), memory_bandwidth_gbps=mem_gbps,
        overlap_efficiency=overlap_efficiency, host_chunk_us=max(host_us, 0.0),
        sm_count=sm_count, host_base_us=max(host_base_us, 0.0), min_gain=min_gain,
    )
    data = {"pipeline": profile.to_dict(), "provenance": provenance,
            "emulated_group": round(1 / (1 - fraction))}  # the EP size the link emulates
    # A benchmark profile is passed as eps_config.cost_profile, which the expert-kernel
    # selector reads too: carry its format (the shipped kernel tables, if any) as well.
    data = dict(kernel_profile_base(), **data)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return profile


def kernel_profile_base():
    try:
        from megatron_eps.policy import kernel_tables
        from megatron_eps.policy.profile import shipped_profile_path

        path = shipped_profile_path(DEVICE)
        if path is not None and os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return {"format": kernel_tables.PROFILE_FORMAT, "version": kernel_tables.PROFILE_VERSION,
                "device": {"name": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"},
                "dtype": "bfloat16", "shapes": []}
    except Exception:  # noqa: BLE001
        return {}


# ----------------------------------------------------------------------------- one point
def comm_only_ms(link, model, tokens, rows, repeats):
    """The N=1 layer's two emulator calls back to back: the dispatch (rows with their routing
    weights packed in 8 extra bf16 columns, as the dispatcher sends them) and the combine."""
    h = MODELS[model]["hidden"]
    src = torch.empty(rows, h + 8, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    out = torch.empty(rows, h, device=DEVICE, dtype=torch.bfloat16)
    back = torch.empty_like(out)

    def run():
        link(dst, src, [rows], [rows])
        link(back, out, [rows], [rows])

    ms, _ = time_ms(run, repeats=repeats)
    return ms


def shared_only_ms(eps, x, repeats):
    if not eps.use_shared_expert:
        return 0.0
    with torch.no_grad():
        ms, _ = time_ms(lambda: eps.shared_experts(x), repeats=repeats)
    return ms


def run_point(eps, model, tokens, bandwidths, links, profiles, free_link, args):
    from megatron_eps.comm import ProcessGroupAllToAll

    x = make_input(model, tokens)
    point = {"model": model, "tokens": tokens, "by_bandwidth": {}}
    with torch.no_grad():
        set_mode(eps, 1, ProcessGroupAllToAll(None), overlap=True)
        point["T_comp_ms"], _ = time_ms(lambda: eps(x), repeats=args.repeats)
        rows = int(eps.token_dispatcher.last_record.global_counts.sum())
        point["rows"] = rows
        point["tokens_per_expert"] = eps.token_dispatcher.last_record.global_counts.reshape(-1).tolist()
        point["T_shared_ms"] = shared_only_ms(eps, x, args.repeats)
        # per-chunk overhead at this load: overlap off, free link
        k = measure_chunk_overhead(eps, model, tokens, free_link, max(3, args.repeats // 2))
        point["overhead_fit"] = k
        for bw in bandwidths:
            link = links[(model, bw)]
            carve = args.gemm_sm_carveout
            r = {"bandwidth_gbps": bw, "gemm_sm_carveout": carve}
            r["T_comm_ms"] = comm_only_ms(link, model, tokens, rows, args.repeats)
            set_mode(eps, 1, link, overlap=False)
            r["T_seq_ms"], _ = time_ms(lambda: eps(x), repeats=args.repeats)
            r["T_N_ms"], r["T_N_tail_ms"] = {}, {}
            for n in DEGREES[model]:
                set_mode(eps, n, link, overlap=True, carveout=carve)
                r["T_N_ms"][n], _ = time_ms(lambda: eps(x), repeats=args.repeats)
            for n in TAIL_DEGREES[model]:
                set_mode(eps, n, link, overlap=True, split="tail", carveout=carve)
                r["T_N_tail_ms"][n], _ = time_ms(lambda: eps(x), repeats=args.repeats)
            candidates = {(n, "equal"): t for n, t in r["T_N_ms"].items()}
            candidates.update({(n, "tail"): t for n, t in r["T_N_tail_ms"].items()})
            best_n, best_split = min(candidates, key=candidates.get)
            r["best_N"] = best_n
            r["best_split"] = best_split
            r["T_eps_ms"] = candidates[(best_n, best_split)]
            set_mode(eps, "auto", link, overlap=True, profile_path=profiles[(model, bw)], carveout=carve)
            eps(x)
            record = eps.token_dispatcher.last_record
            r["auto_N"] = record.num_chunks
            r["auto_chunks"] = list(record.experts_per_chunk)
            # The figures the targets use, re-measured in alternating rounds (sweep: one pass).
            r["sweep_T_seq_ms"], r["sweep_T_eps_ms"] = r["T_seq_ms"], r["T_eps_ms"]
            final = interleaved_ms({
                "seq": lambda: set_mode(eps, 1, link, overlap=False),
                "N1": lambda: set_mode(eps, 1, link, overlap=True),
                "best": lambda: set_mode(eps, best_n, link, overlap=True, split=best_split, carveout=carve),
                "auto": lambda: set_mode(eps, "auto", link, overlap=True, profile_path=profiles[(model, bw)],
                                         carveout=carve),
            }, x, eps, rounds=args.rounds, repeats=args.repeats)
            r["T_seq_ms"], r["T_N1_ms"], r["T_eps_ms"], r["T_auto_ms"] = (
                final["seq"], final["N1"], final["best"], final["auto"])
            # the same best chunks without the carve-out, and with the interleaved plan
            set_mode(eps, best_n, link, overlap=True, split=best_split, carveout=None)
            r["T_best_no_carveout_ms"], _ = time_ms(lambda: eps(x), repeats=args.repeats)
            set_mode(eps, best_n, link, overlap=True, dispatch_ahead=1, split=best_split, carveout=carve)
            r["T_best_ahead1_ms"], _ = time_ms(lambda: eps(x), repeats=args.repeats)
            # shared experts hidden? same plans without them
            if eps.use_shared_expert:
                eps.use_shared_expert = False
                try:
                    set_mode(eps, 1, link, overlap=True)
                    r["T_N1_noshared_ms"], _ = time_ms(lambda: eps(x), repeats=args.repeats)
                    set_mode(eps, best_n, link, overlap=True, split=best_split, carveout=carve)
                    r["T_best_noshared_ms"], _ = time_ms(lambda: eps(x), repeats=args.repeats)
                finally:
                    eps.use_shared_expert = True
                s = point["T_shared_ms"]
                r["shared_hidden_N1"] = 1 - (r["T_N_ms"][1] - r["T_N1_noshared_ms"]) / s
                r["shared_hidden_best"] = 1 - (r["sweep_T_eps_ms"] - r["T_best_noshared_ms"]) / s
            c = min(r["T_comm_ms"], point["T_comp_ms"])
            r["eta"] = (r["T_seq_ms"] - r["T_eps_ms"]) / c
            r["eta_auto"] = (r["T_seq_ms"] - r["T_auto_ms"]) / c
            r["auto_vs_best"] = r["T_auto_ms"] / r["T_eps_ms"] - 1
            r["auto_vs_N1"] = r["T_auto_ms"] / r["T_N1_ms"] - 1
            # the model's view of the same point
            from megatron_eps.bench.emulated_group import emulated_group_counts, emulated_group_shape
            from megatron_eps.policy.cost_model import LayerShape, predict
            from megatron_eps.policy.profile import PipelineProfile
            from megatron_eps.policy.chunks import tail_split

            m = MODELS[model]
            shape = LayerShape(m["hidden"], m["ffn"], m["experts"], 1, m["topk"],
                               shared_ffn_hidden_size=m["shared"] or 0)
            prof = PipelineProfile.from_json(profiles[(model, bw)])
            counts = emulated_group_counts(eps.token_dispatcher.last_record.global_counts, m["ep"])
            shape = emulated_group_shape(shape, m["ep"])
            r["model_ms"] = {n: predict(counts, shape, prof, n, gemm_sm_carveout=carve).t_pipelined * 1e3
                             for n in DEGREES[model]}
            r["model_tail_ms"] = {n: predict(counts, shape, prof, tail_split(m["experts"], n),
                                             gemm_sm_carveout=carve).t_pipelined * 1e3 for n in TAIL_DEGREES[model]}
            r["model_T_seq_ms"] = predict(counts, shape, prof, 1).t_serial * 1e3
            point["by_bandwidth"][str(bw)] = r
    del x
    return point


# ----------------------------------------------------------------------------- trace
def write_trace(eps, model, tokens, link, degree, trace_path, png_path):
    from torch.profiler import ProfilerActivity, profile

    x = make_input(model, tokens)
    set_mode(eps, degree, link, overlap=True)
    eps.token_dispatcher.profiler_ranges = True
    with torch.no_grad():
        for _ in range(3):
            eps(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.profiler.record_function("eps.layer"):
                eps(x)
            torch.cuda.synchronize()
    eps.token_dispatcher.profiler_ranges = False
    prof.export_chrome_trace(trace_path)
    summary = summarize_trace(trace_path)
    if png_path:
        try:
            draw_timeline(trace_path, png_path, title=f"{model} {tokens} tok/rank, N={degree}")
            summary["png"] = os.path.basename(png_path)
        except Exception as exc:  # noqa: BLE001
            summary["png_error"] = repr(exc)
    return summary


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _load_events(trace_path):
    with open(trace_path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize_trace(trace_path):
    """Syncs inside the layer, and per-stream kernel time and the overlap between the streams."""
    events = _load_events(trace_path)
    layer = [e for e in events if e.get("name") == "eps.layer" and e.get("ph") == "X"
             and e.get("cat") in ("user_annotation", "cpu_op")]
    t0, t1 = (layer[0]["ts"], layer[0]["ts"] + layer[0]["dur"]) if layer else (-math.inf, math.inf)
    syncs = {}
    for e in events:
        if e.get("ph") == "X" and t0 <= e.get("ts", -1) <= t1:
            for name in SYNC_CALLS:
                if e.get("name") == name:
                    syncs[name] = syncs.get(name, 0) + 1
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    streams = {}
    for e in kernels:
        streams.setdefault(e.get("tid"), []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    busy = {str(s): sum(b - a for a, b, _ in v) / 1e3 for s, v in streams.items()}
    # overlap: time both streams have a kernel running
    overlap_ms = 0.0
    if len(streams) >= 2:
        ids = sorted(streams, key=lambda s: -len(streams[s]))[:2]
        a = _union(streams[ids[0]])
        b = _union(streams[ids[1]])
        overlap_ms = _intersect(a, b) / 1e3
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / 1e3 if kernels else 0
    return {"syncs_in_layer": syncs, "kernel_busy_ms_by_stream": busy, "two_stream_overlap_ms": overlap_ms,
            "gpu_span_ms": span, "shared_experts": shared_overlap(events, kernels)}


def shared_overlap(events, kernels):
    """GPU time of the shared experts' kernels, and the part of it the link is busy too."""
    link = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "emulated_link" in e["name"] or "nccl" in e["name"].lower()]
    ranges = [e for e in events if e.get("cat") == "gpu_user_annotation"
              and str(e.get("name", "")).startswith("eps.shared_experts")]
    if not ranges or not link:
        return None
    link_tids = {e["tid"] for e in kernels if "emulated_link" in e["name"] or "nccl" in e["name"].lower()}
    a, b = ranges[0]["ts"], ranges[0]["ts"] + ranges[0]["dur"]
    own = _union([(max(e["ts"], a), min(e["ts"] + e["dur"], b)) for e in kernels
                  if e["tid"] not in link_tids and e["ts"] < b and e["ts"] + e["dur"] > a])
    busy = sum(y - x for x, y in own)
    hidden = _intersect(own, _union(link))
    return {"kernel_ms": busy / 1e3, "beside_link_ms": hidden / 1e3, "fraction": hidden / busy if busy else None}


def _union(intervals):
    out = []
    for a, b, *_ in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _intersect(a, b):
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def draw_timeline(trace_path, png_path, title=""):
    """Two-stream timeline: kernels per CUDA stream, stage ranges (eps.*) on top of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = _load_events(trace_path)
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    ranges = [e for e in events if e.get("cat") == "gpu_user_annotation" and str(e.get("name", "")).startswith("eps.")
              and e.get("name") != "eps.layer"]
    if not kernels:
        raise RuntimeError("no kernels in trace")
    t0 = min(e["ts"] for e in kernels)
    streams = sorted({e["tid"] for e in kernels}, key=lambda s: str(s))
    lanes = {s: i for i, s in enumerate(streams)}
    colors = {"sleep": "#d62728", "gemm": "#1f77b4", "copy": "#9467bd", "other": "#7f7f7f"}

    def kind(name):
        n = name.lower()
        if "sleep" in n or "spin" in n or "emulated_link" in n:
            return "sleep"
        if "gemm" in n or "cutlass" in n or "sm90" in n or "matmul" in n or "xmma" in n or "nvjet" in n:
            return "gemm"
        if "copy" in n or "memcpy" in n:
            return "copy"
        return "other"

    fig, ax = plt.subplots(figsize=(16, 2.2 + 0.9 * len(streams)))
    for e in kernels:
        y = lanes[e["tid"]]
        ax.broken_barh([((e["ts"] - t0) / 1e3, e["dur"] / 1e3)], (y - 0.35, 0.5), facecolors=colors[kind(e["name"])])
    stage_colors = {"dispatch": "#ff9896", "experts": "#aec7e8", "combine": "#ffbb78", "shared_experts": "#98df8a"}
    for e in ranges:
        if e.get("tid") not in lanes:
            continue
        y = lanes[e["tid"]]
        stage = e["name"][4:].split("[")[0]
        ax.broken_barh([((e["ts"] - t0) / 1e3, e["dur"] / 1e3)], (y + 0.18, 0.22),
                       facecolors=stage_colors.get(stage, "#c7c7c7"))
        ax.text((e["ts"] - t0) / 1e3, y + 0.45, e["name"][4:], fontsize=6)
    ax.set_yticks(range(len(streams)))
    ax.set_yticklabels([f"stream {s}" for s in streams])
    ax.set_xlabel("ms")
    ax.set_title(title + "  (red: emulated all-to-all, blue: GEMM, purple: copy, grey: other; "
                 "upper bars: eps.* stage ranges)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------- report
def print_table(points):
    log("")
    hdr = (f"{'model':8} {'tok':>6} {'GB/s':>5} {'T_seq':>8} {'T_eps':>8} {'N*':>3} {'T_auto':>8} {'Na':>3} "
           f"{'T_comm':>8} {'T_comp':>8} {'eta':>5} {'auto/best':>9} {'auto/N1':>8} {'shared_hid':>10} {'k_us':>6}")
    log(hdr)
    for p in points:
        if "error" in p:
            log(f"{p['model']:8} {p['tokens']:>6} ERROR {p['error'][:80]}")
            continue
        for bw, r in p["by_bandwidth"].items():
            sh = r.get("shared_hidden_best")
            best = f"{r['best_N']}{'t' if r.get('best_split') == 'tail' else ''}"
            auto = f"{r['auto_N']}{'t' if len(set(r.get('auto_chunks', [0]))) > 1 else ''}"
            log(f"{p['model']:8} {p['tokens']:>6} {bw:>5} {r['T_seq_ms']:8.3f} {r['T_eps_ms']:8.3f} {best:>3} "
                f"{r['T_auto_ms']:8.3f} {auto:>3} {r['T_comm_ms']:8.3f} {p['T_comp_ms']:8.3f} "
                f"{r['eta']:5.2f} {100 * r['auto_vs_best']:8.1f}% {100 * r['auto_vs_N1']:7.1f}% "
                f"{'' if sh is None else f'{100 * sh:9.0f}%':>10} {p['overhead_fit']['k_us']:6.1f}")


def targets(points, min_tokens_eta=4096):
    out = {"eta_dsv2_160_ge_4k": [], "auto_within_5pct": 0, "auto_points": 0, "auto_worse_than_N1_by_2pct": 0,
           "shared_hidden_best": [], "shared_hidden_N1": []}
    for p in points:
        if "error" in p:
            continue
        for bw, r in p["by_bandwidth"].items():
            if p["model"] == "dsv2" and float(bw) == 160 and p["tokens"] >= min_tokens_eta:
                out["eta_dsv2_160_ge_4k"].append(round(r["eta"], 3))
            out["auto_points"] += 1
            out["auto_within_5pct"] += int(r["auto_vs_best"] <= 0.05)
            out["auto_worse_than_N1_by_2pct"] += int(r["auto_vs_N1"] > 0.02)
            if "shared_hidden_best" in r:
                out["shared_hidden_best"].append(round(r["shared_hidden_best"], 3))
                out["shared_hidden_N1"].append(round(r["shared_hidden_N1"], 3))
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="dsv2,mixtral")
    ap.add_argument("--tokens", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--bandwidths", default="160,450", help="emulated link GB/s per rank and direction")
    ap.add_argument("--latency-us", type=float, default=10.0, help="emulated latency of one all-to-all call")
    ap.add_argument("--gemm-sm-carveout", type=int, default=8,
                    help="eps gemm_sm_carveout for the overlapped runs (SMs left to the link kernels)")
    ap.add_argument("--link-ctas", type=int, default=16, help="CTAs of the emulated link (NCCL channels)")
    ap.add_argument("--min-gain", type=float, default=0.10,
                    help="profile min_gain: auto pipelines only for a predicted gain of at least this fraction")
    ap.add_argument("--spin", default=None, choices=["timer", "sleep"], help="link emulator kernel (default timer)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the final seq/N1/best/auto timings")
    ap.add_argument("--kernel", default="auto-pick", help="expert_kernel (default: grouped if present)")
    ap.add_argument("--calib-tokens", type=int, default=16384, help="GPU-bound load for k")
    ap.add_argument("--host-calib-tokens", type=int, default=1024, help="host-bound load for host_chunk_us")
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--trace", default=None, help="Chrome trace of one layer (a PNG timeline beside it)")
    ap.add_argument("--trace-point", default="dsv2,4096,160", help="model,tokens,GB/s of the trace")
    ap.add_argument("--commit", default=os.environ.get("EPS_GIT_COMMIT", "unknown"))
    ap.add_argument("--time-budget-s", type=float, default=330.0, help="skip remaining points after this")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks this script, no numbers")
    args = ap.parse_args(argv)
    started = time.monotonic()
    if args.smoke:
        shrink_for_smoke()
    else:
        assert torch.cuda.is_available(), "bench_pipeline needs a CUDA GPU (or --smoke)"
    torch.manual_seed(0)
    init_megatron()
    import megatron.core

    from megatron_eps.bench.link_emulator import EmulatedLinkAllToAll, calibrate_sleep_cycles_per_ms

    models = [m for m in args.models.split(",") if m]
    token_list = [int(t) for t in args.tokens.split(",") if t]
    bandwidths = [float(b) for b in args.bandwidths.split(",") if b]
    kernel = pick_kernel(args.kernel)
    device_name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke)"
    result = {
        "device": device_name,
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 0,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "megatron_core": getattr(megatron.core, "__version__", "?"), "python": platform.python_version()},
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "git_commit": args.commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "expert_kernel": kernel,
        "latency_us": args.latency_us,
        "gemm_sm_carveout": args.gemm_sm_carveout,
        "link_ctas": args.link_ctas,
        "link_spin": args.spin or "default",
        "repeats": args.repeats,
        "timing": "CUDA events around one layer forward; median of repeats after 3 warm-ups",
        "points": [],
    }
    try:
        import triton

        result["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    log(f"device {device_name} | torch {torch.__version__} | mcore {result['versions']['megatron_core']} | kernel {kernel}")

    # ---- calibration
    cycles = calibrate_sleep_cycles_per_ms() if DEVICE == "cuda" else None
    copy_gbps = measure_copy_gbps()
    calib = {"sleep_cycles_per_ms": cycles, "copy_gbps_read_plus_write": copy_gbps}
    log(f"calibration: _sleep {cycles} cycles/ms, copy {copy_gbps:.0f} GB/s")
    # Free link: a plain copy (no spin), for the per-chunk overhead fits.
    free_link = EmulatedLinkAllToAll(float("inf"), 0.0, 1.0, cycles_per_ms=cycles, spin="sleep")
    layers = {}
    k_fits, host_fits, tflops = [], [], []
    for model in models:
        _, eps = build_layer(model, kernel)
        layers[model] = eps
        tf, ms = measure_expert_tflops(eps, model, 16384 if DEVICE == "cuda" else 256)
        tflops.append(tf)
        # GPU-bound load: the per-chunk cost on the GPU (k); host-bound load: the host's.
        fit = measure_chunk_overhead(eps, model, args.calib_tokens, free_link, args.repeats)
        host_fit = measure_chunk_overhead(eps, model, args.host_calib_tokens, free_link, args.repeats)
        k_fits.append(fit)
        host_fits.append(host_fit)
        calib[f"{model}_expert_tflops_16k"] = tf
        calib[f"{model}_overhead_fit"] = fit
        calib[f"{model}_host_overhead_fit"] = host_fit
        for name, f in (("k", fit), ("host", host_fit)):
            log(f"calibration {model}: experts {tf:.0f} TFLOP/s; {name} = {f['k_us']:.1f} us/chunk at {f['tokens']} "
                f"tok (T(N) {['%.3f' % t for t in f['ms']]} ms for N={f['degrees']})")
    # Per model (k depends on the layer's shapes, as in the paper); the device profile takes the
    # first model's (DSV2 by default: the most degrees, so the best-determined slope).
    model_k = {m: max(f["k_us"], 0.0) for m, f in zip(models, k_fits)}
    model_host = {m: max(f["k_us"], 0.0) for m, f in zip(models, host_fits)}
    model_host_base = {m: max(f["intercept_ms"] * 1e3, 0.0) for m, f in zip(models, host_fits)}
    k_us, host_us = model_k[models[0]], model_host[models[0]]
    expert_tflops = statistics.median(tflops)
    mem_gbps = copy_gbps / 2  # one direction of traffic: the weight reads of a weight-bound GEMM
    result["calibration"] = calib
    result["calibration"]["k_us"] = k_us
    result["calibration"]["host_chunk_us"] = host_us
    result["calibration"]["expert_tflops"] = expert_tflops
    provenance = {
        "device": device_name, "torch": torch.__version__, "megatron_core": result["versions"]["megatron_core"],
        "date": result["date"], "git_commit": args.commit, "command": result["command"],
        "expert_kernel": kernel,
        "chunk_overhead_us": f"{models[0]}: Theil-Sen slope of T(N) (overlap off, free link) at "
                             f"{args.calib_tokens} tokens/rank (GPU-bound); per model: "
                             f"{ {m: round(v, 2) for m, v in model_k.items()} }",
        "host_chunk_us": f"{models[0]}: the same slope at {args.host_calib_tokens} tokens/rank "
                         f"(host-bound); per model: { {m: round(v, 2) for m, v in model_host.items()} }",
        "expert_tflops": f"median over models of the expert backend at 16384 tokens/rank, balanced: "
                         f"{[round(t, 1) for t in tflops]}",
        "memory_bandwidth_gbps": "half of a device-to-device copy's read+write rate",
    }
    tmp = tempfile.mkdtemp(prefix="eps_profiles_")
    links, profiles = {}, {}
    for model in models:
        fraction = (MODELS[model]["ep"] - 1) / MODELS[model]["ep"]
        for bw in bandwidths:
            links[(model, bw)] = EmulatedLinkAllToAll(bw, args.latency_us, fraction, cycles_per_ms=cycles,
                                                      spin=args.spin, num_ctas=args.link_ctas)
            path = os.path.join(tmp, f"{model}_{bw:g}.pipeline.json")
            write_profile(path, bandwidth=bw, latency=args.latency_us, k_us=model_k[model], b_us=0.0,
                          tflops=expert_tflops,
                          mem_gbps=mem_gbps, fraction=fraction, host_us=model_host[model],
                          host_base_us=model_host_base[model], min_gain=args.min_gain,
                          sm_count=result["sm_count"] or None,
                          provenance=dict(provenance, link="emulated (benchmark only)"))
            profiles[(model, bw)] = path

    # ---- correctness spot check: stock vs EPS (overlap on, emulated link), bf16
    result["equality"] = []
    for model in models:
        try:
            stock, eps = build_layer(model, kernel, with_stock=True)
            x = make_input(model, 2048 if DEVICE == "cuda" else 64, seed=7)
            with torch.no_grad():
                ref, _ = stock(x)
                for n, split in ((1, "equal"), (DEGREES[model][-1], "equal"), (TAIL_DEGREES[model][-1], "tail"),
                                 ("auto", "auto")):
                    set_mode(eps, n, links[(model, bandwidths[0])], overlap=True, split=split,
                             profile_path=profiles[(model, bandwidths[0])] if n == "auto" else None,
                             carveout=args.gemm_sm_carveout)
                    out, _ = eps(x)
                    err = ((ref.double() - out.double()).norm() / ref.double().norm()).item()
                    result["equality"].append({"model": model, "N": eps.token_dispatcher.last_record.num_chunks,
                                               "chunks": list(eps.token_dispatcher.last_record.experts_per_chunk),
                                               "rel_err_bf16": err})
                    log(f"equality {model} N={eps.token_dispatcher.last_record.num_chunks}: rel err {err:.2e}")
            del stock, eps, ref, out, x
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            result["equality"].append({"model": model, "error": repr(exc)})
            log(f"equality {model}: ERROR {exc!r}")

    # ---- trace
    if args.trace:
        tm, tt, tb = args.trace_point.split(",")
        try:
            eps = layers[tm]
            link = links[(tm, float(tb))]
            x = make_input(tm, int(tt))
            with torch.no_grad():
                set_mode(eps, "auto", link, overlap=True, profile_path=profiles[(tm, float(tb))])
                eps(x)
                degree = eps.token_dispatcher.last_record.num_chunks
            png = os.path.splitext(args.trace)[0] + ".png"
            result["trace"] = write_trace(eps, tm, int(tt), link, degree, args.trace, png)
            result["trace"]["point"] = {"model": tm, "tokens": int(tt), "bandwidth": float(tb), "N": degree}
            log(f"trace: {result['trace']}")
        except Exception as exc:  # noqa: BLE001
            result["trace"] = {"error": traceback.format_exc()}
            log(f"trace ERROR {exc!r}")

    # ---- sweep
    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    for tokens in token_list:
        for model in models:
            eps = layers[model]
            if time.monotonic() - started > args.time_budget_s:
                result["points"].append({"model": model, "tokens": tokens, "error": "skipped: time budget"})
                continue
            t = time.monotonic()
            try:
                p = run_point(eps, model, tokens, bandwidths, links, profiles, free_link, args)
            except Exception as exc:  # noqa: BLE001
                p = {"model": model, "tokens": tokens, "error": traceback.format_exc()}
                log(f"{model} {tokens}: ERROR {exc!r}")
            p["wall_s"] = time.monotonic() - t
            result["points"].append(p)
            if "error" not in p:
                brief = {bw: (round(r["T_seq_ms"], 3), r["best_N"], round(r["T_eps_ms"], 3), r["auto_N"],
                              round(r["T_auto_ms"], 3), round(r["eta"], 2)) for bw, r in p["by_bandwidth"].items()}
                log(f"{model} {tokens}: {brief} ({p['wall_s']:.1f}s)")
            save()
            torch.cuda.empty_cache()
    layers.clear()
    torch.cuda.empty_cache()
    result["targets"] = targets(result["points"])
    result["wall_s"] = time.monotonic() - started
    save()
    print_table(result["points"])
    log("targets:", json.dumps(result["targets"]))
    from megatron_eps.testing import Utils

    Utils.destroy_model_parallel()


if __name__ == "__main__":
    main()
