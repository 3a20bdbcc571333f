"""Stacked expert weights that share storage with Megatron's parameters.

The GEMM backends want each layer's expert weights as two stacked tensors:

    fc1 [E, F1, H]   (F1 = 2F when gated: rows 0..F-1 feed the activation, F..2F-1 the linear half)
    fc2 [E, H, F]

i.e. each expert's Linear weight in Megatron's own (out_features, in_features) layout.

How each experts class is mapped (never a copy at run time):

* SequentialMLP: every expert has its own Parameters. We pack them once: allocate the stacked
  buffers, copy the weights in, and re-point each Parameter's ``.data`` at its slice. The module's
  parameters and state_dict keys stay exactly the same, and a later ``load_state_dict`` (which
  copies in place) writes straight into the stacked storage. If someone replaces ``.data`` again
  (``module.to()``, ``.cuda()``, ``.half()``), ``is_current`` sees the data pointers moved and
  ``LocalExperts.weights()`` re-packs.
* TEGroupedMLP: Transformer Engine's GroupedLinear holds ``weight0 .. weight{E-1}``; packed the
  same way.
* GroupedMLP (Megatron <= 0.16 legacy, one [H, E*F1] Parameter): already stacked; we take views.

Only inference uses the re-pointed Parameters: Megatron's training DDP re-points Parameters into
its own grad-sync buffer, which would make us re-pack on every step.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megatron_eps.experts.activation import ActivationSpec, unsupported_config_reason


def _experts_kind(module) -> Optional[str]:
    """'sequential', 'te_grouped', 'legacy_grouped', or None for a class we do not know."""
    names = {cls.__name__ for cls in type(module).__mro__}
    if "SequentialMLP" in names:
        return "sequential"
    if "TEGroupedMLP" in names:
        return "te_grouped"
    if "GroupedMLP" in names:
        return "legacy_grouped"
    return None


def _per_expert_params(module, kind) -> Tuple[List[torch.nn.Parameter], List[torch.nn.Parameter]]:
    """The fc1 and fc2 weight Parameters of each expert, in expert order."""
    if kind == "sequential":
        fc1 = [expert.linear_fc1.weight for expert in module.local_experts]
        fc2 = [expert.linear_fc2.weight for expert in module.local_experts]
        return fc1, fc2
    n = int(module.num_local_experts)
    fc1 = [getattr(module.linear_fc1, f"weight{i}", None) for i in range(n)]
    fc2 = [getattr(module.linear_fc2, f"weight{i}", None) for i in range(n)]
    if any(w is None for w in fc1 + fc2):
        raise ValueError(
            f"{type(module).__name__}: the grouped linear layers do not expose weight0.."
            f"weight{n - 1} (a Transformer Engine version with a single grouped parameter?); "
            "set expert_kernel='megatron'"
        )
    return fc1, fc2


def unsupported_module_reason(module, config) -> Optional[str]:
    """Why the GEMM backends cannot use this experts module, or None if they can."""
    kind = _experts_kind(module)
    if kind is None:
        return (
            f"experts module {type(module).__name__} is not supported by the GEMM expert kernels "
            "(supported: SequentialMLP, TEGroupedMLP, GroupedMLP); set expert_kernel='megatron'"
        )
    reason = unsupported_config_reason(config)
    if reason is not None:
        return reason
    if kind == "legacy_grouped":
        return None
    try:
        fc1, fc2 = _per_expert_params(module, kind)
    except ValueError as exc:
        return str(exc)
    shapes1 = {tuple(w.shape) for w in fc1}
    shapes2 = {tuple(w.shape) for w in fc2}
    if len(shapes1) != 1 or len(shapes2) != 1 or len({w.dtype for w in fc1 + fc2}) != 1:
        return f"{type(module).__name__}: experts differ in weight shape or dtype"
    if len({w.device for w in fc1 + fc2}) != 1:
        return f"{type(module).__name__}: expert weights live on different devices"
    if any(not torch.is_tensor(w.data) or type(w.data) is not torch.Tensor for w in fc1 + fc2):
        return f"{type(module).__name__}: expert weights are not plain tensors (quantized?)"
    return None


class ExpertWeights:
    """fc1 [E, F1, H] and fc2 [E, H, F] of one layer's local experts, plus their activation.

    ``fc1``/``fc2`` may be non-contiguous views (legacy GroupedMLP); every row of the last dim is
    contiguous in all cases we build, which is what the GEMM backends need.
    """

    def __init__(
        self,
        fc1: torch.Tensor,
        fc2: torch.Tensor,
        activation: ActivationSpec,
        source: str = "tensors",
        param_pointers: Tuple[int, ...] = (),
    ):
        if fc1.dim() != 3 or fc2.dim() != 3 or fc1.shape[0] != fc2.shape[0]:
            raise ValueError(
                f"expert weights must be fc1 [E, F1, H] and fc2 [E, H, F]; got "
                f"{tuple(fc1.shape)} and {tuple(fc2.shape)}"
            )
        num_experts, f1, hidden = fc1.shape
        ffn = fc2.shape[2]
        if fc2.shape[1] != hidden or f1 != (2 * ffn if activation.gated else ffn):
            raise ValueError(
                f"fc1 {tuple(fc1.shape)} and fc2 {tuple(fc2.shape)} do not form an expert MLP "
                f"(gated={activation.gated})"
            )
        self.fc1 = fc1
        self.fc2 = fc2
        self.activation = activation
        self.source = source
        self._param_pointers = param_pointers
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden, ffn

    @property
    def dtype(self) -> torch.dtype:
        return self.fc1.dtype

    @property
    def device(self) -> torch.device:
        return self.fc1.device

    @classmethod
    def from_tensors(cls, fc1, fc2, activation: Optional[ActivationSpec] = None):
        """Wrap ready-made stacked tensors (benchmarks, calibration, tests)."""
        return cls(fc1, fc2, activation or ActivationSpec.swiglu())

    @classmethod
    def from_module(cls, module, config) -> "ExpertWeights":
        """Stacked views of ``module``'s expert weights; packs per-expert Parameters once."""
        reason = unsupported_module_reason(module, config)
        if reason is not None:
            raise ValueError(reason)
        activation = ActivationSpec.from_config(config)
        kind = _experts_kind(module)
        if kind == "legacy_grouped":
            n, hidden = int(module.num_local_experts), int(config.hidden_size)
            # weight1 is [H, E*F1] viewed by Megatron as [E, H, F1]; weight2 [E*F, H] as [E, F, H].
            fc1 = module.weight1.data.view(n, hidden, -1).transpose(1, 2)
            fc2 = module.weight2.data.view(n, -1, hidden).transpose(1, 2)
            pointers = (module.weight1.data_ptr(), module.weight2.data_ptr())
            return cls(fc1, fc2, activation, kind, pointers)
        fc1_params, fc2_params = _per_expert_params(module, kind)
        # Packing keeps the Parameters' kind. Normal Parameters packed during a forward under
        # torch.inference_mode() must stay normal (a later training forward saves them for
        # backward). Parameters created under inference mode (Megatron-LM's inference scripts
        # build and load the model inside it) must stay inference tensors: a normal storage put
        # under one has no version counter, and the next view of it (stock Linear's
        # weight.t()) fails.
        created_in_inference = any(p.is_inference() for p in fc1_params + fc2_params)
        with torch.inference_mode(created_in_inference), torch.no_grad():
            fc1 = _stack_in_place(fc1_params)
            fc2 = _stack_in_place(fc2_params)
        return cls(fc1, fc2, activation, kind, _pointers(module, kind))

    def is_current(self, module) -> bool:
        """True while every Parameter of ``module`` still lives in our stacked storage."""
        try:
            return _pointers(module, _experts_kind(module)) == self._param_pointers
        except (AttributeError, ValueError):
            return False


def _pointers(module, kind) -> Tuple[int, ...]:
    if kind == "legacy_grouped":
        return (module.weight1.data_ptr(), module.weight2.data_ptr())
    if kind == "sequential":
        pointers = _sequential_pointers(module)
        if pointers is not None:
            return pointers
    fc1, fc2 = _per_expert_params(module, kind)
    return tuple(w.data_ptr() for w in fc1) + tuple(w.data_ptr() for w in fc2)


def _sequential_pointers(module) -> Optional[Tuple[int, ...]]:
    """``_pointers`` of a SequentialMLP read through the modules' own dictionaries.

    This check runs once per layer forward, on the host's critical path before the first expert
    GEMM, and ``nn.Module.__getattr__`` made it cost about 0.5 ms for 64 experts; the
    dictionaries give the same Parameters ten times faster. None where the module is not laid
    out as expected (then the attribute walk decides)."""
    try:
        experts = list(module._modules["local_experts"]._modules.values())
        fc1 = [e._modules["linear_fc1"]._parameters["weight"].data_ptr() for e in experts]
        fc2 = [e._modules["linear_fc2"]._parameters["weight"].data_ptr() for e in experts]
    except (AttributeError, KeyError):
        return None
    return tuple(fc1) + tuple(fc2)


def _already_stacked(params: Sequence[torch.nn.Parameter]) -> Optional[torch.Tensor]:
    """If the Parameters are consecutive equal slices of one storage, that stack as a view."""
    first = params[0].data
    if not first.is_contiguous():
        return None
    step = first.numel() * first.element_size()
    storage = first.untyped_storage().data_ptr()
    for i, p in enumerate(params):
        d = p.data
        if (
            not d.is_contiguous()
            or d.shape != first.shape
            or d.untyped_storage().data_ptr() != storage
            or d.data_ptr() != first.data_ptr() + i * step
        ):
            return None
    base = first.storage_offset()
    # A view over the shared storage: no copy, and the Parameters stay where they are.
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        first.untyped_storage(), base, (len(params),) + tuple(first.shape)
    )


def _stack_in_place(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """One [E, out, in] tensor holding every Parameter's values; Parameters become its views."""
    stacked = _already_stacked(params)
    if stacked is not None:
        return stacked
    first = params[0].data
    stacked = torch.empty((len(params),) + tuple(first.shape), dtype=first.dtype, device=first.device)
    for i, p in enumerate(params):
        stacked[i].copy_(p.data)
        # Re-point the Parameter: same object (optimizer/state_dict keys unchanged), new storage.
        p.data = stacked[i]
    return stacked


class StackedExperts:
    """A LocalExperts look-alike over ready-made stacked weights, with no Megatron module.

    Calibration, benchmarks and kernel tests use it to run the GEMM backends on any shape
    without building a model. ``module`` is None, so the ``megatron`` backend cannot run it.
    """

    module = None

    def __init__(self, weights: ExpertWeights):
        import types

        self._weights = weights
        self.num_local_experts = weights.num_experts
        self.config = types.SimpleNamespace(
            hidden_size=weights.hidden_size,
            moe_ffn_hidden_size=weights.ffn_hidden_size,
            gated_linear_unit=weights.activation.gated,
            activation_func=weights.activation.fn,
            add_bias_linear=False,
            moe_apply_probs_on_input=weights.activation.probs_on_input,
        )

    def weights(self) -> ExpertWeights:
        return self._weights


def synthetic_experts(hidden: int, ffn: int, num_experts: int, dtype, device, seed: int = 0):
    """StackedExperts with random SwiGLU weights scaled like Megatron's init (std 0.02)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fc1 = torch.empty(num_experts, 2 * ffn, hidden, dtype=dtype, device=device)
    fc2 = torch.empty(num_experts, hidden, ffn, dtype=dtype, device=device)
    for e in range(num_experts):  # per expert on the host: bounded host memory for big shapes
        fc1[e].copy_(torch.randn(2 * ffn, hidden, generator=gen) * 0.02)
        fc2[e].copy_(torch.randn(hidden, ffn, generator=gen) * 0.02)
    return StackedExperts(ExpertWeights.from_tensors(fc1, fc2))
