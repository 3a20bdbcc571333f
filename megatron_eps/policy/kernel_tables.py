"""The expert-kernel cost tables: their format in the profile file and the time they predict.

The selector (``experts.selector``) chooses backends from these predictions and the cost model
(``policy.cost_model``) times a chunk's experts with them.

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
"""

from __future__ import annotations

import functools
import json
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_eps.errors import EPSConfigError

PROFILE_FORMAT = "megatron-eps-cost-profile"
PROFILE_VERSION = 1
MAX_SKEW = 4.0


# ---------------------------------------------------------------------------- the file
def read_cost_profile_json(path: str) -> dict:
    """The JSON object in a cost-profile file; EPSConfigError naming ``cost_profile`` when the
    file cannot be read, is not JSON, or does not hold a JSON object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise EPSConfigError(f"eps cost_profile={path!r} cannot be read: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EPSConfigError(
            f"eps cost_profile={path!r} is not valid JSON ({exc}); allowed: a profile written "
            "by megatron-eps-calibrate"
        ) from None
    if not isinstance(data, dict):
        raise EPSConfigError(
            f"eps cost_profile={path!r}: expected a JSON object, got a JSON "
            f"{type(data).__name__}; allowed: a profile written by megatron-eps-calibrate"
        )
    return data


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
    return "".join(c.lower() if c.isalnum() else "_" for c in name).strip("_")


# ---------------------------------------------------------------------------- device naming
def device_name(device: Union[str, torch.device]) -> str:
    """The name profiles are keyed by: the CUDA device name, or 'cpu'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


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
        data = read_cost_profile_json(path)
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


def _nearest(grid, skew, load):
    """Grid value, or (for a hole in the grid) the closest measured point."""
    if (skew, load) in grid:
        return grid[(skew, load)]
    key = min(grid, key=lambda k: (abs(k[0] - skew), abs(math.log(k[1] / load))))
    return grid[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
        return min(predict_from_summary(profile, name, hidden, ffn, n, mean, skew, beside_copy)
                   for name in profile.backends)
    return predict_from_summary(profile, backend, hidden, ffn, n, mean, skew, beside_copy)


def predict_from_summary(profile, backend, hidden, ffn, n, mean, skew, beside_copy=False) -> float:
    """``predict_time`` of a call already summarised (``load_summary``: mean, skew; n experts)."""
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
