"""Self-calibration of the expert-kernel choice at first use.

Where no cost table covers the GPU (an H200 with only H100 tables, a new GPU), ``expert_kernel:
auto`` would fall back to a fixed order, which loses up to 28% on shapes and loads the order
does not suit. Instead, the first time a layer meets a (GPU, expert shape, dtype, load bucket),
``KernelAutotuner`` runs each candidate backend on that real load, keeps the fastest, and
persists the decision:

* a load bucket is the mean rows per expert to half an octave and the skew (max / mean) to an
  octave, coarse enough that a prefill run meets few buckets;
* the cache file (``kernel_cache`` setting, else ``$MEGATRON_EPS_KERNEL_CACHE``, else
  ``~/.cache/megatron_eps/kernels-<gpu>.json``) is keyed by the GPU name and the torch, Triton
  and megatron-eps versions; a corrupt or foreign file gives one warning and a fresh start;
* a call that runs beside a transfer (a chunk of a pipelined forward) is its own bucket: there
  the GEMMs share memory bandwidth (and SMs, with a carve-out) with the copies, so its timing
  is taken under that condition, in the pipeline itself;
* the choice is per rank and needs no agreement: the pipeline degree is chosen from the shipped
  tables and the count matrix only, never from these timings, so every rank still picks the
  same chunks.

Each candidate runs ``1 + TIMED_RUNS`` times in each of ``TUNING_ROUNDS`` rounds of
alternating order (a round's first run warms up, the others are timed back to back; the median
round counts, so one preempted round does not decide): that is the overhead, once per bucket
and GPU (the file keeps it for later runs). A first compile of the triton backend's GEMMs takes
about a second, longer than a whole prefill forward's GEMMs, so at the first meeting of a
bucket they start compiling on a worker thread (``compiling``), the forward goes on with a
candidate that is ready (untimed, not recorded), and the bucket is timed at the first meeting
after the compilation finished.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from megatron_eps.timing import BACK_TO_BACK_CALLS, back_to_back_seconds

logger = logging.getLogger(__name__)

FORMAT = "megatron-eps-kernel-cache"
VERSION = 2
CACHE_ENV = "MEGATRON_EPS_KERNEL_CACHE"

TIMED_RUNS = BACK_TO_BACK_CALLS
TUNING_ROUNDS = 3

# (seconds, output) of running ``fn`` after a warm-up call; ``label`` names the backend
Timer = Callable[[Callable[[], torch.Tensor], str], Tuple[float, torch.Tensor]]


def cuda_timer(fn: Callable[[], torch.Tensor], label: str = "") -> Tuple[float, torch.Tensor]:
    """Seconds per call of ``TIMED_RUNS`` calls issued back to back from an idle GPU, after a
    warm-up call (timing.back_to_back_seconds: what a forward pays)."""
    fn()  # compile and warm up
    device = torch.device("cuda", torch.cuda.current_device())
    return back_to_back_seconds(lambda i: fn(), device, TIMED_RUNS)


def wall_timer(fn: Callable[[], torch.Tensor], label: str = "") -> Tuple[float, torch.Tensor]:
    fn()
    best = float("inf")
    for _ in range(TIMED_RUNS):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def load_bucket(tokens_per_expert: Sequence[int]) -> Tuple[int, int]:
    """(mean rows per expert in half octaves, max/mean rows in octaves). With 64 experts,
    Zipf skews 0 / 0.5 / 1 / 1.5 fall in skew classes 0 / 2 / 4 / 5: coarser classes let one
    skew's winner decide for another where the backends rank differently."""
    counts = [int(c) for c in tokens_per_expert]
    total = sum(counts)
    if total == 0:
        return (-1, 0)
    mean = total / len(counts)
    skew = max(counts) / mean
    return (round(math.log2(mean) * 2), round(math.log2(skew)))


def default_cache_path(device_name: str) -> str:
    from megatron_eps.policy.kernel_tables import gpu_slug

    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    root = os.path.join(os.path.expanduser("~"), ".cache", "megatron_eps")
    return os.path.join(root, f"kernels-{gpu_slug(device_name)}.json")


def current_versions() -> Dict[str, str]:
    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "none"
    from megatron_eps.provenance import __version__

    versions["megatron_eps"] = __version__
    return versions


class KernelAutotuner:
    """Decisions per (shape, dtype, load bucket) for one GPU, kept in a JSON file."""

    def __init__(self, path: str, device_name: str, timer: Timer,
                 versions: Optional[Dict[str, str]] = None):
        self.path, self.device_name, self.timer = path, device_name, timer
        self.versions = versions if versions is not None else current_versions()
        self.decisions: Dict[str, dict] = {}
        self.timed_calls = 0  # candidates timed (each 1 + TIMED_RUNS runs)
        self.tuning_seconds = 0.0  # host time spent calibrating, compilation included
        self.untimed_calls = 0  # calls run while their bucket's candidates still compiled
        self._compiling: Dict[str, dict] = {}  # bucket key -> {candidate: BackgroundCompile}
        self._load()

    # ------------------------------------------------------------------ the file
    def _header(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "device": self.device_name,
                "versions": self.versions}

    def _load(self) -> None:
        if not os.path.isfile(self.path):
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            logger.warning("megatron-eps: kernel cache %s is unreadable (%s); calibrating afresh",
                           self.path, exc)
            return
        header = self._header()
        if not isinstance(data, dict) or any(data.get(k) != v for k, v in header.items()):
            logger.warning(
                "megatron-eps: kernel cache %s is for another GPU or other versions (%s); "
                "calibrating afresh", self.path,
                {k: data.get(k) for k in header} if isinstance(data, dict) else type(data).__name__)
            return
        decisions = data.get("decisions", {})
        if isinstance(decisions, dict):
            self.decisions = {k: v for k, v in decisions.items()
                              if isinstance(v, dict) and isinstance(v.get("winner"), str)}

    def _save(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            merged = dict(self.decisions)
            if os.path.isfile(self.path):  # keep what other processes wrote meanwhile
                try:
                    with open(self.path) as f:
                        other = json.load(f)
                    if isinstance(other, dict) and all(other.get(k) == v for k, v in self._header().items()):
                        merged = {**other.get("decisions", {}), **merged}
                except (OSError, ValueError):
                    pass
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({**self._header(), "decisions": merged}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("megatron-eps: cannot write kernel cache %s (%s); keeping decisions "
                           "in memory", self.path, exc)

    # ------------------------------------------------------------------ decisions
    @staticmethod
    def key(shape: Sequence[int], dtype: torch.dtype, tokens_per_expert: Sequence[int],
            beside_copy: bool = False) -> str:
        load, skew = load_bucket(tokens_per_expert)
        condition = "/beside_copy" if beside_copy else ""
        return f"{'x'.join(map(str, shape))}/{str(dtype).replace('torch.', '')}/{load}/{skew}{condition}"

    def decision(self, key: str) -> Optional[str]:
        entry = self.decisions.get(key)
        return entry["winner"] if entry else None

    @property
    def waiting_buckets(self) -> list:
        """Buckets met whose timing waits for candidates compiling in the background."""
        return list(self._compiling)

    def compiling(self, key: str, candidates: Sequence[str],
                  start: Callable[[str], object]) -> list:
        """The candidates of ``key`` whose kernels still compile in the background. At the
        first meeting of ``key`` ``start(name)`` starts each candidate's compilation (it returns
        a ``triton_launch.BackgroundCompile``, or None when nothing is left to compile)."""
        started = time.perf_counter()
        pending = self._compiling.get(key)
        if pending is None:
            pending = {}
            for name in candidates:
                try:
                    handle = start(name)
                except Exception as exc:  # noqa: BLE001 - timing it will report the failure
                    logger.warning("megatron-eps: expert kernel %s did not start compiling (%s)",
                                   name, exc)
                    handle = None
                if handle is not None:
                    pending[name] = handle
            self._compiling[key] = pending
        for name in [n for n, handle in pending.items() if handle.done()]:
            try:
                pending.pop(name).wait()
            except Exception:  # noqa: BLE001 - a failed compile: timing it reports the failure
                pass
        self.tuning_seconds += time.perf_counter() - started
        return list(pending)

    def tune(self, key: str, candidates: Sequence[str],
             run: Callable[[str], torch.Tensor]) -> Tuple[str, torch.Tensor]:
        """Time ``run(name)`` for every candidate; keep and persist the fastest. Returns the
        winner and its output (every candidate computes the same result)."""
        samples: Dict[str, list] = {}
        outputs = {}
        started = time.perf_counter()
        # Rounds in alternating order, each candidate's median kept: a disturbance (a host
        # stall, a clock change) in one round does not decide, and a candidate whose host time
        # varies more is not favoured the way a minimum would favour it (bench_experts.py ranks
        # the backends by medians too).
        for round_index in range(TUNING_ROUNDS):
            order = list(candidates) if round_index % 2 == 0 else list(reversed(candidates))
            for name in order:
                if round_index and name not in samples:
                    continue  # it failed in the first round: not a candidate
                try:
                    seconds, out = self.timer(lambda name=name: run(name), name)
                except Exception as exc:  # noqa: BLE001 - a backend that fails is not a candidate
                    if not round_index:
                        logger.warning("megatron-eps: expert kernel %s failed while calibrating "
                                       "(%s)", name, exc)
                    continue
                if not round_index:
                    self.timed_calls += 1
                    outputs[name] = out
                samples.setdefault(name, []).append(seconds)
            if len(samples) < 2:
                break  # nothing to rank
        times = {name: statistics.median(values) for name, values in samples.items()}
        self.tuning_seconds += time.perf_counter() - started
        if not times:
            raise RuntimeError(f"no expert kernel of {list(candidates)} ran for {key}")
        self._compiling.pop(key, None)
        winner = min(times, key=times.get)
        self.decisions[key] = {"winner": winner,
                               "times_us": {n: round(t * 1e6, 2) for n, t in times.items()}}
        self._save()
        return winner, outputs[winner]


_TUNERS: Dict[Tuple[str, str], KernelAutotuner] = {}


def autotuner_for(device: torch.device, path: Optional[str], timer: Optional[Timer] = None):
    """The process's autotuner for ``device`` and cache ``path`` (None: the default path)."""
    from megatron_eps.policy.kernel_tables import device_name

    name = device_name(device)
    path = path or default_cache_path(name)
    key = (name, os.path.abspath(path))
    if key not in _TUNERS:
        _TUNERS[key] = KernelAutotuner(path, name, timer or (cuda_timer if device.type == "cuda" else wall_timer))
    elif timer is not None:
        _TUNERS[key].timer = timer
    return _TUNERS[key]


def calibration_activity() -> Tuple[int, int]:
    """(candidate runs so far, buckets waiting for a compilation) over every autotuner of the
    process. A forward after which the first number did not grow and the second is 0 ran
    without calibrating: a benchmark warms up until then, so that its timed forwards do not
    include the one-time calibration."""
    runs = sum(t.timed_calls + t.untimed_calls for t in _TUNERS.values())
    waiting = sum(len(t.waiting_buckets) for t in _TUNERS.values())
    return runs, waiting


def warm_up_while_calibrating(step: Callable[[], object], device: torch.device,
                               limit_s: float = 120.0) -> int:
    """Call ``step()`` (a forward) until one call ran, on every rank of the default group,
    without calibrating expert kernels or waiting for their compilation; at most ``limit_s``
    seconds on a rank. Returns the calls made (>= 1), the same on every rank.

    Benchmarks warm up with it so that their timed forwards leave out the one-time
    self-calibration: a Triton compilation takes a second or more, many fast forwards."""
    import torch.distributed as dist

    deadline = time.monotonic() + limit_s
    calls = 0
    while True:
        runs_before = calibration_activity()[0]
        step()
        calls += 1
        runs, waiting = calibration_activity()
        busy = (runs != runs_before or waiting > 0) and time.monotonic() < deadline
        flag = torch.tensor([float(busy)], dtype=torch.float64,
                            device=device if device.type == "cuda" else "cpu")
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return calls
