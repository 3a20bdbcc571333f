"""Choose the expert GEMM backend per call from measured costs (``expert_kernel="auto"``).

Cost profile
    A JSON file written by ``megatron-eps-calibrate``: for each calibrated expert shape
    (hidden H, ffn F, experts n) and each backend, the median time of the whole expert
    computation (fc1 + activation + fc2) over a grid of loads: mean tokens per expert
    (8 .. 8192) x skew (Zipf exponent 0, 0.5, 1.0, 1.5 of the per-expert shares).
    Profiles for known GPUs ship in ``megatron_eps/profiles/<gpu-name-slug>.json``.

Prediction (``predict_time``)
    A call is summarised by its mean load m = rows / n and its skew s, the Zipf exponent whose
    largest share equals the call's largest share (max rows / rows), so the summary means the
    same for any n. Per calibrated shape, log(time) is interpolated bilinearly in (log m, s)
    (s clamped to the grid; below the smallest load the time is flat, the weight-streaming
    floor; above the largest it grows linearly with m). Other shapes are scaled by
    n*H*F (both the FLOPs and the weight bytes of the experts scale with it) and the calibrated
    shapes are blended by inverse squared distance in (log n, log H, log F); an exact shape
    match uses its own table only.

Beside a transfer (``beside_copy``)
    A profile may also hold, per load, each backend's time while a copy-engine copy of the
    call's rows runs on another stream (``seconds_beside_copy``, ``megatron-eps-calibrate
    --beside-copy``): GEMMs then share memory bandwidth, and where the pipeline carves SMs out,
    fewer SMs. A pipelined forward (its chunks run beside dispatch and combine) chooses from
    those tables where they exist, from the plain ones otherwise.

Choice (``choose_backend``)
    An explicit backend name is checked for availability (a clear error names the setting
    ``expert_kernel`` and the values available here). ``auto`` takes the backend with the least
    predicted time among the available GEMM backends that the profile has measured, using the
    profile given, else the one shipped for this GPU, else (a GPU with no profile of its own)
    the tables of the nearest known GPU (same compute capability, nearest SM count), which rank
    the backends while self-calibration times the close ones. Without a profile that covers
    the device (same device name and dtype), the documented default is deterministic:
    ``dense`` on CPU (where it is the per-expert math), ``grouped`` on GPUs (the most robust
    backend in our H100 measurements), else ``triton``, else ``dense``; ``megatron`` only when
    no GEMM backend can run these experts (unsupported module or config).
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_eps.experts import base

PROFILE_FORMAT = "megatron-eps-cost-profile"
PROFILE_VERSION = 1
# Predictions closer than this are treated as a tie, broken by the default order (the
# backends' gpu_default_rank): a backend predicted faster by a hair is not worth the risk of
# the prediction being noise.
SELECTION_MARGIN = 0.03
# Where the tables' best two backends are predicted closer than this, the tables cannot tell
# them apart (their interpolation error is larger): self-calibration times those on the real load.
UNSURE_MARGIN = 0.10
# Across expert widths the tables' interpolation lost at most 28% on the H200: a backend they
# predict this much slower than the fastest is not worth timing on a width they lack.
OUT_OF_REACH = 1.5
# Calls predicted faster than this are launch- and weight-read-bound, and there the tables'
# ranking did not carry from one run to the next: on the H200 the same 8-rows-per-expert call
# of triton took 0.24 ms in the calibration run and 0.48 ms in a later one, while grouped took
# 0.32 and 0.37 ms (results/experts/bench_experts_h200*.json; trace_expert_point_dsv2_ep8_8.json: triton's GPU
# kernel took 236 us and its host issue 393 us per call). There every backend predicted within
# LAUNCH_BOUND_REACH of the fastest is timed.
LAUNCH_BOUND_SECONDS = 1e-3
LAUNCH_BOUND_REACH = 3.0
MAX_SKEW = 4.0


# ---------------------------------------------------------------------------- device naming
def device_name(device: Union[str, torch.device]) -> str:
    """The name profiles are keyed by: the CUDA device name, or 'cpu'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3': the shipped profile's file name
    (``<slug>.json``, with ``experts``, ``pipeline`` and ``links`` sections)."""
    from megatron_eps.policy.profile import gpu_slug

    return gpu_slug(name)


# ---------------------------------------------------------------------------- load summary
@functools.lru_cache(maxsize=256)
def _zipf_max_share_curve(num_experts: int) -> Tuple[np.ndarray, np.ndarray]:
    """(skews, largest share of Zipf(s) over num_experts) on a fine grid; share grows with s."""
    skews = np.linspace(0.0, MAX_SKEW, 401)
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    shares = np.array([1.0 / np.sum(ranks ** (-s)) for s in skews])
    return skews, shares


def zipf_shares(num_experts: int, skew: float) -> np.ndarray:
    """Shares of Zipf(skew) over num_experts, largest first (skew 0: uniform)."""
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** (-float(skew))
    return weights / weights.sum()


def load_summary(tokens_per_expert: Sequence[int]) -> Tuple[float, float]:
    """(mean tokens per expert, equivalent Zipf skew) of one call's row counts."""
    counts = [int(c) for c in tokens_per_expert]
    return _summary(len(counts), sum(counts), max(counts, default=0))


@functools.lru_cache(maxsize=4096)
def _summary(n: int, total: int, largest: int) -> Tuple[float, float]:
    """Cached: every chunk asks (for the choice and for self-calibration's candidates)."""
    if n == 0 or total == 0:
        return 0.0, 0.0
    mean = total / n
    if n == 1:
        return mean, 0.0
    skews, shares = _zipf_max_share_curve(n)
    return mean, float(np.interp(largest / total, shares, skews))


# ---------------------------------------------------------------------------- profile
class _ShapeTable:
    """log-time grid of one (backend, shape): rows = skews, columns = loads."""

    def __init__(self, loads: Sequence[float], skews: Sequence[float], seconds: np.ndarray):
        self.log_loads = np.log(np.asarray(loads, dtype=np.float64))
        self.skews = np.asarray(skews, dtype=np.float64)
        self.log_t = np.log(np.asarray(seconds, dtype=np.float64))

    def predict(self, mean: float, skew: float) -> float:
        lm = math.log(max(mean, 1e-9))
        extra = 0.0
        if lm > self.log_loads[-1]:
            extra = lm - self.log_loads[-1]  # compute bound: time proportional to rows
            lm = self.log_loads[-1]
        lm = max(lm, self.log_loads[0])  # weight-streaming floor below the smallest load
        s = min(max(skew, self.skews[0]), self.skews[-1])
        per_skew = [np.interp(lm, self.log_loads, row) for row in self.log_t]
        return float(math.exp(np.interp(s, self.skews, per_skew) + extra))


class CostProfile:
    """Measured expert-computation times of one device (see the module docstring)."""

    def __init__(self, data: dict, path: Optional[str] = None):
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(
                f"{path or 'cost profile'} is not a megatron-eps cost profile "
                f"(format={data.get('format')!r}); write one with megatron-eps-calibrate"
            )
        self.path = path
        self.data = data
        self.device_name: str = data["device"]["name"]
        # Set when these tables stand in for a GPU that has none (the nearest known one): they
        # rank the backends there, and self-calibration times the ones within reach.
        self.borrowed_for: Optional[str] = None
        self.dtype: str = data.get("dtype", "bfloat16")
        # (backend, H, F, n) -> _ShapeTable, alone and beside a copy-engine copy
        self.tables = self._tables(data["shapes"], "seconds")
        self.tables_beside_copy = self._tables(data["shapes"], "seconds_beside_copy")
        if self.tables_beside_copy and not stand_in_is_sm_free(data.get("beside_copy")):
            # The copy they were measured beside took SMs (a compute-bound GEMM slowed down
            # beside it), so they describe contention a copy-engine transfer does not cause.
            self.tables_beside_copy = {}
        self.backends = sorted({k[0] for k in self.tables})
        # _predicted_times' memo: it lives and dies with these tables (a module-level memo
        # keyed by id() would hand a later profile at the same address these predictions).
        self.predictions: Dict[tuple, Dict[str, float]] = {}

    @staticmethod
    def _tables(shapes, field: str) -> Dict[Tuple[str, int, int, int], _ShapeTable]:
        tables = {}
        for shape in shapes:
            key = (int(shape["hidden"]), int(shape["ffn"]), int(shape["experts"]))
            measured = [load for load in shape["loads"] if isinstance(load.get(field), dict)]
            for backend in sorted({b for load in measured for b in load[field]}):
                grid: Dict[Tuple[float, float], float] = {}
                for load in measured:
                    t = load[field].get(backend)
                    if t is not None and t > 0 and math.isfinite(t):
                        grid[(float(load["skew"]), float(load["tokens_per_expert"]))] = float(t)
                skews = sorted({s for s, _ in grid})
                loads = sorted({m for _, m in grid})
                if not skews or not loads:
                    continue
                seconds = np.array([[_nearest(grid, s, m) for m in loads] for s in skews])
                # More rows never take less time: a point slower than a larger load was a
                # disturbed measurement (host jitter hits launch-bound backends), not the kernel.
                seconds = np.minimum.accumulate(seconds[:, ::-1], axis=1)[:, ::-1]
                tables[(backend,) + key] = _ShapeTable(loads, skews, seconds)
        return tables

    @classmethod
    def from_file(cls, path: str) -> "CostProfile":
        data = _read_json(path)
        if data.get("format") != PROFILE_FORMAT and isinstance(data.get("experts"), dict):
            data = data["experts"]  # a combined file: kernel tables under "experts"
        return cls(data, path)

    def covers(self, device, dtype: torch.dtype) -> bool:
        """Measured on this device's kind of GPU (or CPU), or standing in for it, in this dtype."""
        return (device_name(device) in (self.device_name, self.borrowed_for)
                and self.dtype == _dtype_name(dtype))

    def covers_shape(self, hidden: int, ffn: int) -> bool:
        """Some table was measured with this expert width (hidden, ffn), any expert count, on
        this very GPU (borrowed tables never decide a call alone)."""
        return self.borrowed_for is None and any(k[1:3] == (hidden, ffn) for k in self.tables)

    def shapes(self, backend: str, beside_copy: bool = False) -> List[Tuple[int, int, int]]:
        return [k[1:] for k in self.tables_for(backend, beside_copy) if k[0] == backend]

    def tables_for(self, backend: str, beside_copy: bool):
        """The beside-copy tables where they measured ``backend``, else the plain ones."""
        if beside_copy and any(k[0] == backend for k in self.tables_beside_copy):
            return self.tables_beside_copy
        return self.tables


# A copy that uses no SMs slows a compute-bound GEMM only through memory traffic: by a few
# percent. The profile's stand-in check ("beside_copy": a large GEMM alone and beside the copy)
# must stay under this, or its beside-copy tables are not used.
SM_FREE_GEMM_SLOWDOWN = 1.3


def stand_in_is_sm_free(check: Optional[dict]) -> bool:
    """Whether the copy a profile's beside-copy tables were measured beside used no SMs
    (``megatron-eps-calibrate --beside-copy`` records the check; without one, trusted)."""
    if not isinstance(check, dict) or not check.get("gemm_seconds"):
        return True
    return check.get("gemm_seconds_beside_copy", 0.0) / check["gemm_seconds"] < SM_FREE_GEMM_SLOWDOWN


def _read_json(path: str) -> dict:
    """The profile's JSON object (EPSConfigError, a ValueError, naming cost_profile if not)."""
    from megatron_eps.policy.profile import read_cost_profile_json

    return read_cost_profile_json(path)


def _nearest(grid, skew, load):
    """Grid value, or (for a hole in the grid) the closest measured point."""
    if (skew, load) in grid:
        return grid[(skew, load)]
    key = min(grid, key=lambda k: (abs(k[0] - skew), abs(math.log(k[1] / load))))
    return grid[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def load_cost_profile(path: Optional[str], device) -> Optional[CostProfile]:
    """The expert-kernel cost tables for ``device`` (``policy.profile.load_kernel_tables``: the
    ``cost_profile`` file's, else the shipped ones, else the nearest known GPU's). A file that
    is no valid profile raises EPSConfigError (a ValueError) naming ``cost_profile``."""
    from megatron_eps.policy.profile import load_kernel_tables

    return load_kernel_tables(path, device)


def clear_caches() -> None:
    _AVAILABLE.clear()


# ---------------------------------------------------------------------------- prediction
def predict_time(profile: CostProfile, backend: Optional[str], shape, tokens_per_expert,
                 beside_copy: bool = False) -> float:
    """Predicted seconds of one expert computation (fc1 + activation + fc2).

    backend: a backend name, or None for the fastest backend the profile measured (what
        ``auto`` picks when all of them can run).
    shape: (hidden_size, ffn_hidden_size[, num_experts]) or any object with ``hidden_size`` and
        ``ffn_hidden_size`` attributes (e.g. cost_model.LayerShape). The number of experts of
        the call is always len(tokens_per_expert): a pipeline chunk covers fewer experts than
        the layer has, so a third element / ``num_local_experts`` is not used.
    beside_copy: the call runs beside a transfer (a pipelined chunk): the beside-copy tables
        where the profile has them.
    """
    if hasattr(shape, "hidden_size"):
        hidden, ffn = int(shape.hidden_size), int(shape.ffn_hidden_size)
    else:
        hidden, ffn = int(shape[0]), int(shape[1])
    counts = [int(c) for c in tokens_per_expert]
    mean, skew = load_summary(counts)
    if not counts or mean == 0:
        return 0.0
    n = len(counts)
    if backend is None:
        return min(_predict(profile, name, hidden, ffn, n, mean, skew, beside_copy)
                   for name in profile.backends)
    return _predict(profile, backend, hidden, ffn, n, mean, skew, beside_copy)


def _predict(profile, backend, hidden, ffn, n, mean, skew, beside_copy=False) -> float:
    tables = profile.tables_for(backend, beside_copy)
    shapes = profile.shapes(backend, beside_copy)
    if not shapes:
        raise ValueError(
            f"cost profile {profile.path or ''} has no measurements of expert_kernel={backend!r}; "
            f"it measured: {', '.join(profile.backends)}"
        )
    work = float(n) * hidden * ffn
    weighted_log, total_weight = 0.0, 0.0
    for h_r, f_r, n_r in shapes:
        log_t = math.log(tables[(backend, h_r, f_r, n_r)].predict(mean, skew))
        log_t += math.log(work / (float(n_r) * h_r * f_r))
        distance = (
            abs(math.log(n / n_r)) + abs(math.log(hidden / h_r)) + abs(math.log(ffn / f_r))
        )
        if distance < 1e-9:
            return math.exp(log_t)
        weight = 1.0 / distance**2
        weighted_log += weight * log_t
        total_weight += weight
    return math.exp(weighted_log / total_weight)


# ---------------------------------------------------------------------------- choice
_AVAILABLE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _available(local_experts, device, dtype) -> List[str]:
    """available_backends, cached per experts object (the answer depends on module and config)."""
    key = (str(torch.device(device)), dtype)
    try:
        per_experts = _AVAILABLE.setdefault(local_experts, {})
    except TypeError:  # not weak-referenceable: no cache
        per_experts = {}
    if key not in per_experts:
        per_experts[key] = base.available_backends(local_experts, device, dtype)
    return per_experts[key]


def default_backend(device, candidates: Sequence[str]) -> str:
    """The documented choice when no cost profile covers the device."""
    if torch.device(device).type == "cpu" and base.cpu_default() in candidates:
        return base.cpu_default()
    for name in base.gpu_default_order():
        if name in candidates:
            return name
    return candidates[0] if candidates else "megatron"


def _preference_order(device, candidates: Sequence[str]) -> List[str]:
    """Candidates in tie-break order: the default backend first, then the GPU default order."""
    first = default_backend(device, candidates)
    rest = [n for n in base.gpu_default_order() if n in candidates and n != first]
    return [first] + rest + [n for n in candidates if n != first and n not in rest]


def _allowed_values() -> List[str]:
    return list(base.kernel_names())


def calibration_candidates(local_experts, device, dtype: torch.dtype, profile=None,
                           tokens_per_expert: Optional[Sequence[int]] = None,
                           beside_copy: bool = False) -> List[str]:
    """The GEMM backends to time on this real load (self-calibration), or [] when the cost
    tables decide it or there is nothing to pick.

    The tables decide a call when they were measured on this kind of device, in this dtype and
    with this expert width (hidden, ffn), and (given the call's ``tokens_per_expert``) when
    they predict one backend faster than the others by more than ``UNSURE_MARGIN`` (by more
    than ``LAUNCH_BOUND_REACH`` for a call predicted under ``LAUNCH_BOUND_SECONDS``).
    Interpolating across widths lost up to 28% on the H200 (research notes, section 4), so on
    a width the tables lack every backend they do not predict ``OUT_OF_REACH`` times slower
    than the fastest is timed; where two backends are predicted within a few percent, the
    interpolation error decides, and only the backends within the margin of the fastest are
    timed.
    """
    if profile is None:
        profile = load_cost_profile(None, device)
    gemm = [name for name in _available(local_experts, device, dtype) if name != "megatron"]
    if len(gemm) < 2:
        return []
    if profile is None or not profile.covers(device, dtype):
        return gemm
    weights = local_experts.weights()
    measured = [name for name in gemm if name in profile.backends]
    times = (_predicted_times(profile, measured, weights, tokens_per_expert, beside_copy)
             if tokens_per_expert is not None and len(measured) > 1 else {})
    fastest = min(times.values()) if times else None
    if not profile.covers_shape(weights.hidden_size, weights.ffn_hidden_size):
        if fastest is None:
            return gemm
        reachable = [name for name in gemm if times.get(name, 0.0) <= fastest * OUT_OF_REACH]
        return reachable if len(reachable) > 1 else []
    if fastest is None:
        return []
    margin = LAUNCH_BOUND_REACH if fastest < LAUNCH_BOUND_SECONDS else 1 + UNSURE_MARGIN
    close = [name for name in measured if times[name] <= fastest * margin]
    return close if len(close) > 1 else []


def _predicted_times(profile, candidates, weights, tokens_per_expert, beside_copy) -> Dict[str, float]:
    """Predicted seconds per candidate, cached on a fine grid of the load summary (1/8 octave
    of load, 0.05 skew) so that the hot path is a dict lookup. {} for an empty call."""
    hidden, ffn, n = weights.hidden_size, weights.ffn_hidden_size, len(tokens_per_expert)
    mean, skew = load_summary(tokens_per_expert)
    if mean == 0:
        return {}
    key = (tuple(candidates), hidden, ffn, n, round(math.log2(mean) * 8), round(skew * 20), beside_copy)
    times = profile.predictions.get(key)
    if times is None:
        times = {name: _predict(profile, name, hidden, ffn, n, mean, skew, beside_copy)
                 for name in candidates}
        profile.predictions[key] = times
    return times


def choose_backend(
    requested: str,
    local_experts,
    tokens_per_expert: Sequence[int],
    device,
    dtype: torch.dtype,
    profile: Optional[CostProfile] = None,
    beside_copy: bool = False,
) -> str:
    """The backend name to run this call with (see the module docstring); ``beside_copy``: the
    call runs beside a transfer (a chunk of a pipelined forward)."""
    allowed = _allowed_values()
    if requested not in allowed and requested not in base.registered_backends():
        raise ValueError(
            f"eps expert_kernel={requested!r} is not allowed; allowed values: {', '.join(allowed)}"
        )
    available = _available(local_experts, device, dtype)
    if requested != "auto":
        if requested in available:
            return requested
        backend_cls = base._REGISTRY.get(requested)
        reason = (
            backend_cls.unavailable_reason(local_experts, device, dtype)
            if backend_cls is not None
            else "its module could not be imported"
        )
        raise ValueError(
            f"eps expert_kernel={requested!r} cannot run here ({torch.device(device)}, {dtype}): "
            f"{reason}. Available values here: {', '.join(['auto'] + available)}"
        )
    gemm = [name for name in available if name != "megatron"]
    if not gemm:
        return "megatron"
    if profile is None:
        profile = load_cost_profile(None, device)
    if profile is None or not profile.covers(device, dtype):
        return default_backend(device, gemm)
    candidates = [name for name in gemm if name in profile.backends]
    if not candidates:
        return default_backend(device, gemm)
    times = _predicted_times(profile, candidates, local_experts.weights(), tokens_per_expert, beside_copy)
    if not times:
        return default_backend(device, candidates)
    fastest = min(times.values())
    preference = _preference_order(device, candidates)
    return next(name for name in preference if times[name] <= fastest * (1 + SELECTION_MARGIN))
