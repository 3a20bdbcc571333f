"""The expert-compute interface shared by every backend.

A backend computes, for a contiguous range of a layer's local experts, exactly what Megatron's
experts module computes for them:

    out[rows of expert e] = fc2_e( act(fc1_e(x[rows])) * probs[rows, None] )

(probs applied after the activation and before fc2, as Megatron's MLP does with
``per_token_scale``; with ``moe_apply_probs_on_input`` they scale the input instead).

Shapes (M = rows in this call, H = hidden size, n = number of experts in the range):
    hidden            [M, H]   rows grouped by expert, in expert order
    tokens_per_expert list[int] of length n, sum == M (host ints: no device sync), or for
                      the backends that take them, ``gemm_common.DeviceRowEnds``
    probs             [M]      one routing weight per row
    returns           [M, H]   same dtype as hidden

Backends register themselves with ``register_backend``; the layer asks ``get_backend(name)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Sequence, Type

import torch


class ExpertBackend(ABC):
    """One way of running the local experts' GEMMs."""

    name: str = ""
    # True when ``hidden`` may have a row stride larger than its width (rows that carry extra
    # columns, as the dispatcher's packed rows do); others get a contiguous copy.
    accepts_strided_rows: bool = False
    # Without a cost profile (and to break near-ties with one) GPUs prefer the backend with the
    # lowest rank; None: never a default. ``cpu_default``: the choice on CPUs.
    gpu_default_rank: Optional[int] = None
    cpu_default: bool = False
    # True when ``forward`` also takes the rows per expert as ``gemm_common.DeviceRowEnds``
    # (offsets the host never reads), so a forward can run without waiting for the counts.
    takes_device_row_ends: bool = False

    @classmethod
    def unavailable_reason(
        cls, local_experts: "LocalExperts", device: torch.device, dtype: torch.dtype
    ) -> Optional[str]:
        """None if this backend can run these experts on ``device``/``dtype``, else why not."""
        return None

    @abstractmethod
    def forward(
        self,
        local_experts: "LocalExperts",
        hidden: torch.Tensor,
        tokens_per_expert: Sequence[int],
        probs: torch.Tensor,
        first_expert: int,
    ) -> torch.Tensor:
        """Run experts ``first_expert .. first_expert + len(tokens_per_expert) - 1``."""

    def compile_in_background(self, local_experts: "LocalExperts", hidden: torch.Tensor,
                              tokens_per_expert: Sequence[int], probs: torch.Tensor,
                              first_expert: int):
        """Start compiling, on a worker thread, the kernels ``forward`` of this call would
        compile first. Returns a ``triton_launch.BackgroundCompile`` to poll, or None when
        nothing is left to compile (or this backend cannot compile in the background)."""
        return None


class LocalExperts:
    """The local experts of one MoE layer, as the backends see them.

    Wraps Megatron's experts module (SequentialMLP, TEGroupedMLP or GroupedMLP) without copying
    it. ``weights()`` returns stacked weight views for the GEMM backends (built once, lazily).
    """

    def __init__(self, module: torch.nn.Module, config):
        self.module = module
        self.config = config
        self.num_local_experts = int(module.num_local_experts)
        self._weights = None
        self._checked_this_forward = None  # None: check on every weights() call
        # This forward's expert offsets, staged on the device in one copy (ExpertRunner.prepare).
        self.staged_int32: Dict[tuple, torch.Tensor] = {}

    def begin_forward(self) -> None:
        """From now on check the stacked views once per layer forward, not once per chunk (the
        check walks every expert parameter); call at the start of every forward."""
        self._checked_this_forward = False
        self.staged_int32 = {}

    def weights(self):
        """Stacked views of the expert weights (see megatron_eps.experts.weights)."""
        from megatron_eps.experts.weights import ExpertWeights

        if self._weights is None or (
            not self._checked_this_forward and not self._weights.is_current(self.module)
        ):
            self._weights = ExpertWeights.from_module(self.module, self.config)
        if self._checked_this_forward is not None:
            self._checked_this_forward = True
        return self._weights


_REGISTRY: Dict[str, Type[ExpertBackend]] = {}
_INSTANCES: Dict[str, ExpertBackend] = {}


def register_backend(cls: Type[ExpertBackend]) -> Type[ExpertBackend]:
    """Class decorator: make ``cls`` selectable as ``expert_kernel=cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty 'name'")
    _REGISTRY[cls.name] = cls
    _INSTANCES.pop(cls.name, None)
    return cls


def registered_backends() -> List[str]:
    _import_builtin_backends()
    return sorted(_REGISTRY)


def kernel_names() -> tuple:
    """The allowed ``expert_kernel`` values: "auto" and every registered backend (the one list;
    a backend becomes selectable by ``register_backend`` alone)."""
    _import_builtin_backends()
    ranked = sorted(_REGISTRY.values(), key=lambda c: (c.gpu_default_rank is None,
                                                        c.gpu_default_rank or 0, c.name))
    return ("auto",) + tuple(c.name for c in ranked)


def gpu_default_order() -> tuple:
    """Registered backends a GPU may default to, most preferred first."""
    _import_builtin_backends()
    ranked = [c for c in _REGISTRY.values() if c.gpu_default_rank is not None]
    return tuple(c.name for c in sorted(ranked, key=lambda c: c.gpu_default_rank))


def cpu_default() -> Optional[str]:
    _import_builtin_backends()
    return next((c.name for c in _REGISTRY.values() if c.cpu_default), None)


def get_backend(name: str) -> ExpertBackend:
    """The backend instance registered under ``name`` (raises with the known names)."""
    _import_builtin_backends()
    if name not in _REGISTRY:
        raise ValueError(
            f"eps expert_kernel={name!r} has no registered backend; "
            f"registered: {', '.join(sorted(_REGISTRY))}"
        )
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def available_backends(
    local_experts: LocalExperts, device: torch.device, dtype: torch.dtype
) -> List[str]:
    """Names of the backends that can run ``local_experts`` here."""
    _import_builtin_backends()
    return [
        name
        for name, cls in sorted(_REGISTRY.items())
        if cls.unavailable_reason(local_experts, device, dtype) is None
    ]


@register_backend
class MegatronExpertsBackend(ExpertBackend):
    """Calls the layer's own Megatron experts module: the stock numerics, the stock speed.

    Experts outside the requested range get zero rows, so this works for every experts class
    Megatron has (it is also the reference the other backends are tested against).
    """

    name = "megatron"

    def forward(self, local_experts, hidden, tokens_per_expert, probs, first_expert):
        counts = [0] * local_experts.num_local_experts
        counts[first_expert : first_expert + len(tokens_per_expert)] = list(tokens_per_expert)
        output, bias = local_experts.module(hidden, torch.tensor(counts, dtype=torch.long), probs)
        if bias is not None:
            raise NotImplementedError("expert output bias is not supported by MoELayer either")
        return output


_BUILTINS_IMPORTED = False


def _import_builtin_backends():
    """Import the modules that register the other backends (they may be absent or optional)."""
    global _BUILTINS_IMPORTED
    if _BUILTINS_IMPORTED:
        return
    _BUILTINS_IMPORTED = True
    import importlib

    for module in ("grouped", "dense", "triton_grouped", "te"):
        try:
            importlib.import_module(f"megatron_eps.experts.{module}")
        except ImportError:
            pass
