"""``megatron-eps-calibrate``: measure the expert backends and write a cost profile (JSON).

For each expert shape (hidden H, ffn F, local experts n; SwiGLU experts as in every supported
model) and each available GEMM backend, times the whole expert computation (fc1 + activation +
probs + fc2, exactly what a backend's forward does) over a grid of loads: mean tokens per expert
(default 8 .. 8192, powers of two) x skew (Zipf exponents 0, 0.5, 1.0, 1.5 of the per-expert
shares; expert order shuffled with a fixed seed). Timing: batches of calls issued back to back
from an idle GPU (timing), warm-up first, the backends' batches interleaved, several
input sets rotated so no call reads the previous call's input from L2, median of the batches
(host clock on CPU). The profile records the device name, torch/triton/megatron-core
versions, the shapes, the grid and the medians; megatron_eps.experts.selector reads it.

Examples:
    megatron-eps-calibrate --config configs/deepseek_v2_lite.yaml --ep 1 --out my_gpu.json
    megatron-eps-calibrate --hidden 2048 --ffn 1408 --experts 64 --out my_gpu.json
    megatron-eps-calibrate --shape 5120,1536,20 --shape 2048,1408,64 --out profile.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_eps.experts.weights import synthetic_experts
from megatron_eps.provenance import versions


class CalibrateError(ValueError):
    """A calibration option that is not allowed here; the message names it (the command prints
    it as ``megatron-eps-calibrate: error: ...``, exit status 2)."""


DEFAULT_LOADS = tuple(2**i for i in range(3, 14))  # 8 .. 8192 tokens per expert
DEFAULT_SKEWS = (0.0, 0.5, 1.0, 1.5)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------- loads
def make_counts(num_experts: int, mean_tokens: float, skew: float, seed: int = 0) -> List[int]:
    """Rows per expert: total n*mean split by Zipf(skew) shares, experts in shuffled order."""
    from megatron_eps.policy.kernel_tables import zipf_shares

    total = int(round(num_experts * mean_tokens))
    exact = zipf_shares(num_experts, skew) * total
    counts = np.floor(exact).astype(np.int64)
    # Hand the rounding remainder to the largest fractional parts (sum stays exact).
    remainder = total - int(counts.sum())
    if remainder > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    order = np.random.default_rng(seed).permutation(num_experts)
    return [int(c) for c in counts[order]]


# ---------------------------------------------------------------------------- experts
def make_inputs(rows: int, hidden: int, dtype, device, sets: int, seed: int = 0):
    """``sets`` (hidden, probs) pairs of random values (never zeros: zeros time differently)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(sets):
        x = torch.randn(rows, hidden, device=device, dtype=torch.float32, generator=gen).to(dtype)
        p = torch.rand(rows, device=device, dtype=torch.float32, generator=gen)
        out.append((x, p))
    return out


# ---------------------------------------------------------------------------- timing
def time_call(
    fn: Callable[[int], object],
    device: torch.device,
    target_s: float = 0.03,
    min_reps: int = 5,
    max_reps: int = 50,
    warmup: int = 2,
) -> float:
    """Median seconds per call of ``fn(i)`` (i = call index, used to rotate inputs) over batches
    of ``BACK_TO_BACK_CALLS`` calls issued back to back (timing.back_to_back_seconds, the timing
    the self-calibration uses); about ``target_s`` in all, ``min_reps`` to ``max_reps`` calls."""
    return time_calls_interleaved({"call": fn}, device, target_s, min_reps, max_reps, warmup)["call"]


def time_calls_interleaved(
    fns: Dict[str, Callable[[int], object]],
    device: torch.device,
    target_s: float = 0.03,
    min_reps: int = 5,
    max_reps: int = 50,
    warmup: int = 2,
) -> Dict[str, float]:
    """``time_call`` for several callables at once, their batches interleaved in rounds whose
    order alternates (the self-calibration's order too).

    Timed one after the other, the backends of one compute-bound point were timed under
    different conditions: on the H200, grouped and triton measured 8.3 and 8.9 ms interleaved
    but 9.4 and 8.5 ms in turn, at the same load (results/experts/bench_experts_h200_qwen3_tuner_vs_bench.json).
    A clock that drifts under the power limit is the likely cause (not traced); interleaved,
    any drift shifts every callable alike.
    """
    from megatron_eps.timing import BACK_TO_BACK_CALLS, back_to_back_seconds

    batches = {}
    for name, fn in fns.items():
        for i in range(warmup):
            fn(i)
        probe, _ = back_to_back_seconds(fn, device, 1, first_index=warmup)
        calls = min(max(target_s / max(probe, 1e-6), min_reps), max_reps)
        batches[name] = max(3, int(calls) // BACK_TO_BACK_CALLS)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(max(batches.values(), default=0)):
        for name in names if round_index % 2 == 0 else names[::-1]:
            if round_index < batches[name]:
                seconds, _ = back_to_back_seconds(fns[name], device,
                                                  first_index=round_index * BACK_TO_BACK_CALLS)
                samples[name].append(seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def warm_gpu(device: torch.device, seconds: float = 1.0) -> None:
    """Keep the GPU busy for a while so clocks have ramped up before the first measurement."""
    if device.type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            torch.mm(a, a)
        torch.cuda.synchronize(device)


def measurable_backends(experts, device, dtype, requested: Optional[Sequence[str]] = None) -> List[str]:
    """Available GEMM backends (``megatron`` needs a real module; calibration does not time it)."""
    from megatron_eps.experts.base import available_backends

    names = [b for b in available_backends(experts, device, dtype) if b != "megatron"]
    if requested:
        missing = [b for b in requested if b not in names]
        if missing:
            raise CalibrateError(
                f"--backends {','.join(missing)} cannot run here; available: {', '.join(names)}"
            )
        names = [b for b in names if b in requested]
    return names


@contextlib.contextmanager
def offsets_staged(experts, counts: Sequence[int], device: torch.device):
    """While timing one load: its expert row offsets staged on the device once, as a layer's
    forward stages every chunk's (ExpertRunner.prepare), so a timed call does not pay the
    per-call pinned copy a layer does not pay (about 30 us of host time on the H200's host,
    trace_expert_point_qwen3_ep2_24_skew0.json)."""
    from megatron_eps.experts.gemm_common import row_ends, stage_int32_batch

    experts.staged_int32 = stage_int32_batch([row_ends(counts)], device)
    try:
        yield
    finally:
        experts.staged_int32 = {}


def measure_point(experts, backends, counts, inputs, device, target_s) -> Dict[str, float]:
    """Median seconds of each backend on one load (inputs rotated between repeats, backends
    interleaved: ``time_calls_interleaved``)."""
    from megatron_eps.experts.base import get_backend

    rows = sum(counts)

    def runner(backend):
        def run(i):
            x, p = inputs[i % len(inputs)]
            return backend.forward(experts, x[:rows], counts, p[:rows], 0)
        return run

    with torch.no_grad(), offsets_staged(experts, counts, device):
        return time_calls_interleaved({name: runner(get_backend(name)) for name in backends},
                                      device, target_s=target_s)


class CopyBeside:
    """A copy on a side stream that runs while a timed call runs: the stand-in for a transfer.

    A pipelined chunk's GEMMs run while the transport's copy engines move rows to and from the
    peers. On one GPU the stand-in is a host-to-device copy from pinned memory, which the copy
    engines carry with no SM. (A device-to-device ``copy_`` on one GPU is not: on the H200 it ran
    as SM work and a compute-bound GEMM beside it ran 2.3x slower.) It does not load HBM the way
    peer traffic does; ``copy_engine_check`` records how it behaves, and the selector uses the
    tables only where a GEMM kept its time beside it (``policy.kernel_tables.stand_in_is_sm_free``).
    """

    def __init__(self, device: torch.device, max_bytes: int = 2 << 30):
        self.device = device
        self.source = torch.empty(max_bytes, dtype=torch.uint8, pin_memory=True)
        self.target = torch.empty(max_bytes, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device)
        probe = 64 << 20
        self.bytes_per_second = probe / time_call(lambda i: self._copy(probe), device, target_s=0.01)

    def _copy(self, nbytes: int) -> None:
        self.target[:nbytes].copy_(self.source[:nbytes], non_blocking=True)

    def copy_seconds(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_second

    def bytes_for(self, seconds: float) -> int:
        return min(self.source.numel(), max(1 << 20, int(seconds * self.bytes_per_second)))

    def issue(self, seconds: float) -> None:
        """Enqueue on the side stream one copy that lasts about ``seconds`` (or the largest one)."""
        with torch.cuda.stream(self.stream):
            self._copy(self.bytes_for(seconds))

    def drain(self) -> None:
        self.stream.synchronize()


def measure_point_beside_copy(experts, backends, counts, inputs, device, target_s,
                              alone: Dict[str, float], beside: "CopyBeside") -> Dict[str, float]:
    """Median seconds of each backend on one load while a copy that outlasts the call runs on
    another stream (``alone``: the same backends' times without it)."""
    from megatron_eps.experts.base import get_backend

    rows = sum(counts)

    def runner(backend, lasting):
        def run(i):
            beside.issue(lasting)
            x, p = inputs[i % len(inputs)]
            return backend.forward(experts, x[:rows], counts, p[:rows], 0)
        return run

    with torch.no_grad(), offsets_staged(experts, counts, device):
        seconds = time_calls_interleaved(
            {name: runner(get_backend(name), 1.5 * alone[name]) for name in backends},
            device, target_s=target_s)
    beside.drain()
    return seconds


# ---------------------------------------------------------------------------- environment
def device_info(device: torch.device) -> dict:
    from megatron_eps.policy.kernel_tables import device_name, gpu_slug

    name = device_name(device)
    info = {"name": name, "slug": gpu_slug(name), "type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            capability=list(torch.cuda.get_device_capability(device)),
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    return info


# ---------------------------------------------------------------------------- shapes
def shapes_from_args(args) -> List[Tuple[int, int, int]]:
    shapes = []
    for text in args.shape or []:
        try:
            h, f, n = (int(v) for v in text.split(","))
        except ValueError:
            raise CalibrateError(f"--shape {text!r}: expected HIDDEN,FFN,EXPERTS (three integers)") from None
        shapes.append((h, f, n))
    if args.config:
        shapes.append(shape_from_model_yaml(args.config, args.ep))
    given = {f"--{k}": getattr(args, k) for k in ("hidden", "ffn", "experts")}
    if any(v is not None for v in given.values()):
        for flag, value in given.items():
            if value is not None and value < 1:
                raise CalibrateError(f"{flag} {value}: allowed values are integers >= 1")
        missing = [flag for flag, value in given.items() if value is None]
        if missing:
            raise CalibrateError(
                f"{', '.join(missing)} missing: --hidden, --ffn and --experts go together "
                "(local experts per rank)"
            )
        shapes.append((args.hidden, args.ffn, args.experts))
    if not shapes:
        raise CalibrateError("name a shape: --config MODEL.yaml, --hidden/--ffn/--experts, or --shape H,F,E")
    for h, f, n in shapes:
        if min(h, f, n) <= 0:
            raise CalibrateError(f"shape H={h} F={f} experts={n}: all must be positive")
    return shapes


def shape_from_model_yaml(path: str, ep: Optional[int]) -> Tuple[int, int, int]:
    """(hidden, moe ffn, local experts) from a configs/<model>.yaml (model: and parallel: keys)."""
    import yaml

    from megatron_eps.inference.model_config import ModelConfigError
    from megatron_eps.inference.shipped_configs import resolve_config

    try:
        path = resolve_config(path)  # a file, or the name of a shipped config
    except ModelConfigError as exc:
        raise CalibrateError(str(exc)) from None
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    model = data.get("model", data)
    try:
        hidden = int(model["hidden_size"])
        ffn = int(model.get("moe_ffn_hidden_size") or model["ffn_hidden_size"])
        experts = int(model["num_moe_experts"])
    except (KeyError, TypeError, ValueError):
        raise CalibrateError(
            f"--config {path!r}: needs model.hidden_size, model.moe_ffn_hidden_size and "
            "model.num_moe_experts (or pass --hidden --ffn --experts)"
        ) from None
    if ep is None:
        ep = (data.get("parallel") or {}).get("expert_model_parallel_size") or 1
    ep = int(ep)
    if experts % ep:
        raise CalibrateError(f"--config {path!r}: {experts} experts do not divide over --ep {ep}")
    return hidden, ffn, experts // ep


# ---------------------------------------------------------------------------- main
def calibrate(
    shapes,
    device: torch.device,
    dtype,
    loads=DEFAULT_LOADS,
    skews=DEFAULT_SKEWS,
    backends: Optional[Sequence[str]] = None,
    target_s: float = 0.03,
    max_rows: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    beside_copy: bool = False,
) -> dict:
    """The kernel tables (the profile's ``experts`` section) of ``shapes`` on ``device``;
    ``beside_copy`` also times every point beside a copy-engine copy (CUDA only)."""
    from tqdm import tqdm

    beside = CopyBeside(device) if beside_copy and device.type == "cuda" else None
    warm_gpu(device)
    shape_records = []
    total_points = len(shapes) * len(loads) * len(skews)
    bar = tqdm(total=total_points, desc="calibrating", unit="load", disable=not progress, file=sys.stderr)
    for hidden, ffn, n in shapes:
        experts = synthetic_experts(hidden, ffn, n, dtype, device, seed)
        names = measurable_backends(experts, device, dtype, backends)
        rows_needed = max(int(round(n * m)) for m in loads)
        if max_rows is not None:
            rows_needed = min(rows_needed, max_rows)
        inputs = make_inputs(rows_needed, hidden, dtype, device, sets=3 if device.type == "cuda" else 1, seed=seed)
        records = []
        for mean in loads:
            for skew in skews:
                bar.set_postfix_str(f"H{hidden} F{ffn} n{n} load {mean} skew {skew}")
                counts = make_counts(n, mean, skew, seed)
                if sum(counts) > rows_needed:
                    bar.update(1)
                    continue
                seconds = measure_point(experts, names, counts, inputs, device, target_s)
                record = {
                    "tokens_per_expert": mean,
                    "skew": skew,
                    "rows": sum(counts),
                    "max_tokens": max(counts),
                    "counts": counts,
                    "seconds": seconds,
                }
                if beside is not None:
                    record["seconds_beside_copy"] = measure_point_beside_copy(
                        experts, names, counts, inputs, device, target_s, seconds, beside)
                records.append(record)
                bar.update(1)
        shape_records.append(
            {"hidden": hidden, "ffn": ffn, "experts": n, "gated": True, "activation": "swiglu",
             "backends": names, "loads": records}
        )
        del experts, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    from megatron_eps.policy.kernel_tables import PROFILE_FORMAT, PROFILE_VERSION

    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "device": device_info(device),
        "versions": versions(),
        "dtype": str(dtype).replace("torch.", ""),
        "timing": {"method": ("median of back-to-back batches of calls, the backends' batches "
                              "interleaved (calibrate.kernels.time_calls_interleaved)"),
                   "target_seconds_per_point": target_s, "rotating_input_sets": 3 if device.type == "cuda" else 1},
        "grid": {"tokens_per_expert": list(loads), "skews": list(skews)},
        "beside_copy": copy_engine_check(beside) if beside is not None else None,
        "shapes": shape_records,
    }


def copy_engine_check(beside: CopyBeside) -> dict:
    """How the beside-copy stand-in behaves here: its bandwidth, a persistent GEMM that holds
    every SM alone and beside it, and the copy's bandwidth beside that GEMM (an SM-based copy
    would wait for the GEMM's SMs and crawl)."""
    device = beside.device
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    gemm = time_call(lambda i: torch.mm(a, a), device, target_s=0.05)

    def gemm_beside_copy(i):
        beside.issue(1.5 * gemm)
        return torch.mm(a, a)

    with_copy = time_call(gemm_beside_copy, device, target_s=0.05)
    beside.drain()
    for _ in range(4):  # GEMMs enqueued first: the copy runs while they hold the SMs
        torch.mm(a, a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    nbytes = beside.bytes_for(2 * gemm)
    with torch.cuda.stream(beside.stream):
        start.record()
        beside._copy(nbytes)
        end.record()
    torch.cuda.synchronize(device)
    return {"stand_in": "pinned host-to-device copy",
            "copy_gb_per_s": beside.bytes_per_second / 1e9,
            "copy_gb_per_s_beside_gemm": nbytes / (start.elapsed_time(end) / 1e3) / 1e9,
            "gemm_seconds": gemm, "gemm_seconds_beside_copy": with_copy}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-eps-calibrate",
        description="Time the expert GEMM backends over a grid of loads and write a cost profile.",
    )
    parser.add_argument("--config", help="model YAML (a file, or the name of a shipped config such as "
                        "deepseek_v2_lite) to take the expert shape from")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (local experts = experts / ep)")
    parser.add_argument("--hidden", type=int, help="hidden size H")
    parser.add_argument("--ffn", type=int, help="expert ffn hidden size F")
    parser.add_argument("--experts", type=int, help="local experts per rank")
    parser.add_argument("--shape", action="append", help="HIDDEN,FFN,LOCAL_EXPERTS (repeatable)")
    parser.add_argument("--out", required=True, help="where to write the JSON profile")
    parser.add_argument("--loads", default=",".join(map(str, DEFAULT_LOADS)), help="mean tokens per expert")
    parser.add_argument("--skews", default=",".join(map(str, DEFAULT_SKEWS)), help="Zipf exponents")
    parser.add_argument("--backends", default=None, help="comma list (default: every available one)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--target-ms", type=float, default=30.0, help="time spent per backend and load")
    parser.add_argument("--max-rows", type=int, default=None, help="skip loads with more rows than this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--beside-copy", action="store_true",
                        help="also time every load beside a pinned host-to-device copy (a stand-in for "
                        "a pipelined chunk's transfer; CUDA only): the seconds_beside_copy tables, "
                        "used only if the recorded check shows the copy took no SMs")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CalibrateError as exc:
        parser.error(str(exc))


def run(args) -> int:
    """The kernel calibration of parsed ``args`` (``build_parser``)."""
    shapes = shapes_from_args(args)
    try:
        loads = [int(v) for v in args.loads.split(",")]
        skews = [float(v) for v in args.skews.split(",")]
    except ValueError:
        raise CalibrateError("--loads takes integers and --skews numbers, comma-separated") from None
    if min(loads) <= 0 or min(skews) < 0:
        raise CalibrateError("--loads must be positive and --skews non-negative")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise CalibrateError(f"--device {args.device!r}: allowed values: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CalibrateError(f"--device {args.device!r}: allowed values: cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CalibrateError(f"--device {args.device}: no CUDA device is available here; allowed "
                         "values here: cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CalibrateError(f"--device {args.device}: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    profile = calibrate(
        shapes,
        device,
        DTYPES[args.dtype],
        loads=loads,
        skews=skews,
        backends=backends,
        target_s=args.target_ms / 1e3,
        max_rows=args.max_rows,
        seed=args.seed,
        progress=not args.no_progress,
        beside_copy=args.beside_copy,
    )
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"wrote {args.out}: {len(shapes)} shape(s) on {profile['device']['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
