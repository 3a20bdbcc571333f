"""Choose the expert GEMM backend per call from measured costs (``expert_kernel="auto"``).

The costs are the profile's kernel tables (``policy.kernel_tables``: format and prediction).

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

import math
import weakref
from typing import Dict, List, Optional, Sequence

import torch

from megatron_eps.experts import base
from megatron_eps.policy.kernel_tables import CostProfile, load_summary, predict_from_summary
from megatron_eps.policy.profile import load_kernel_tables

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


def clear_caches() -> None:
    _AVAILABLE.clear()


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
        profile = load_kernel_tables(None, device)
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
        times = {name: predict_from_summary(profile, name, hidden, ffn, n, mean, skew, beside_copy)
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
        profile = load_kernel_tables(None, device)
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
