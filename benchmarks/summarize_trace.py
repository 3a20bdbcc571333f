"""Where the time of one profiled step goes, from a torch.profiler Chrome trace.

    python benchmarks/summarize_trace.py TRACE.json [TRACE.json ...] [--top 12] [--out F.json]

For each trace: the span from the first to the last GPU kernel, the GPU busy time (union of
kernel and memcpy intervals) and so the idle time, the kernels with the most GPU time, the CUDA
runtime calls with the most host time, the host time of the marked ranges (record_function,
such as EPS's phases), and the largest GPU idle gaps together with the host
ops that ran inside each one (what the GPU waited for). Written for the prefill's
``--profile-dir`` traces (one step of one mode), usable on any torch.profiler trace.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_overlap import length, union  # noqa: E402

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _events(path: str) -> List[dict]:
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _totals(events: List[dict], top: Optional[int] = None, width: int = 0) -> List[Dict]:
    """[{name, us, count}] of ``events`` summed by name (cut to ``width`` characters), the
    most time first; the first ``top`` (all when None)."""
    totals: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        entry = totals[e["name"][:width] if width else e["name"]]
        entry[0] += e["dur"]
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"name": n, "us": round(v[0], 1), "count": v[1]} for n, v in ranked]


def summarize(path: str, top: int = 12) -> Dict:
    """The summary of one trace (times in microseconds)."""
    events = _events(path)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not gpu:
        raise ValueError(f"{path}: no GPU kernels in the trace (was CUDA activity profiled?)")
    busy = union((e["ts"], e["ts"] + e["dur"]) for e in gpu)
    span_start, span_end = busy[0][0], busy[-1][1]
    busy_us = length(busy)
    host = sorted((e for e in events if e.get("cat") in ("cpu_op", "python_function",
                                                         "user_annotation", "cuda_runtime",
                                                         "cuda_driver")),
                  key=lambda e: e["ts"])
    host_starts = [e["ts"] for e in host]
    gaps = sorted(((b[0] - a[1], a[1], b[0]) for a, b in zip(busy, busy[1:])), reverse=True)[:top]

    def ops_during(start: float, end: float) -> List[str]:
        # What the host ran while the GPU had nothing to do: the longest host ops that lie
        # inside the gap (runtime calls included, so a blocking copy or sync shows), else the
        # innermost op that spans it.
        inside, spanning = [], []
        for e in host[:bisect.bisect_right(host_starts, end)]:
            e_end = e["ts"] + e["dur"]
            if e["ts"] >= start and e_end <= end:
                inside.append((-e["dur"], e["name"][:60]))
            elif e["ts"] < end and e_end > start:
                spanning.append((e["dur"], e["name"][:60]))
        if inside:
            return [f"{name} {-dur:.0f}us" for dur, name in sorted(inside)[:3]]
        return [name for _, name in sorted(spanning)[:1]]

    return {
        "trace": path,
        "gpu_span_us": round(span_end - span_start, 1),
        "gpu_busy_us": round(busy_us, 1),
        "gpu_idle_us": round(span_end - span_start - busy_us, 1),
        "kernel_launches": len(gpu),
        "top_kernels": _totals(gpu, top, width=90),
        "top_runtime_calls": _totals(
            [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")], top),
        # host time of the marked ranges (record_function; EPS's phases when enabled)
        "host_ranges": _totals([e for e in events if e.get("cat") == "user_annotation"
                                and not e["name"].startswith("ProfilerStep")]),
        "largest_gaps": [{"us": round(g, 1), "at_us": round(s - span_start, 1),
                          "host_ops": ops_during(s, e)} for g, s, e in gaps],
    }


def _print(summary: Dict) -> None:
    print(f"== {summary['trace']}")
    print(f"GPU span {summary['gpu_span_us'] / 1e3:.2f} ms, busy {summary['gpu_busy_us'] / 1e3:.2f} ms, "
          f"idle {summary['gpu_idle_us'] / 1e3:.2f} ms, {summary['kernel_launches']} GPU ops")
    for title, key in (("", "top_kernels"), ("host: CUDA runtime calls", "top_runtime_calls"),
                       ("host: marked ranges", "host_ranges")):
        if title and summary[key]:
            print(f"  {title}")
        for row in summary[key]:
            print(f"  {row['us'] / 1e3:8.3f} ms {row['count']:5d}x  {row['name']}")
    print("  largest GPU idle gaps (at, from the first kernel)")
    for row in summary["largest_gaps"]:
        print(f"  {row['us']:8.1f} us at {row['at_us'] / 1e3:7.2f} ms  {'; '.join(row['host_ops'])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=None, help="also write the summaries as JSON")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top {args.top}: must be at least 1")
    summaries = []
    for path in args.traces:
        try:
            summaries.append(summarize(path, args.top))
        except (OSError, ValueError, KeyError) as exc:
            print(f"summarize_trace: {path}: {exc}", file=sys.stderr)
            return 1
        _print(summaries[-1])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summaries, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
