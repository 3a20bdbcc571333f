"""The shared experts of a MoE layer: fc1 -> one fused activation kernel -> fc2.

Megatron's SharedExpertMLP computes its activation as separate elementwise kernels over the
[T, 2 Fs] fc1 output (chunk, silu, multiply: three passes, each rounding to the activation
dtype). ``SharedExpertRunner`` calls the module's own ``linear_fc1`` and ``linear_fc2`` (so tensor
parallelism, sequence parallelism and the state_dict stay the module's) and puts the fused
activation kernel of the routed experts (``triton_kernels.fused_activation``: one read of the
fc1 output, one write, fp32 math, one rounding) between them. Whatever that path would not
reproduce runs the module's own forward instead (``fused_path_reason``).

On a GPU, when the caller asks for it and the shared experts issue no collective of their own,
the runner issues them on a side stream (``issue``), so they overlap the routing metadata, the
row placement and the routed GEMMs; the caller joins them (``SharedOutput.join``) before it adds
their output.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_eps.experts.activation import ActivationSpec, unsupported_config_reason


def _stock_shared_forward():
    """The forward of Megatron's SharedExpertMLP (None where it does not import)."""
    try:
        from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
    except ImportError:
        return None
    return SharedExpertMLP.forward


def fused_path_reason(module) -> Optional[str]:
    """Why ``module`` must run its own forward, or None when fc1 -> fused activation -> fc2
    computes what it computes (up to the activation's one rounding).

    Device-independent: the tensors' device is checked per call (``SharedExpertRunner``).
    """
    forward = _stock_shared_forward()
    if forward is None or type(module).forward is not forward:
        return f"{type(module).__name__} is not Megatron's SharedExpertMLP (its forward may differ)"
    gated = getattr(module, "use_shared_expert_gate", False)
    if gated or getattr(module, "gate_weight", None) is not None:
        return "the shared experts have a gate (shared_expert_gate)"
    if not (hasattr(module, "linear_fc1") and hasattr(module, "linear_fc2")):
        return "the shared experts have no linear_fc1/linear_fc2"
    config = module.config
    reason = unsupported_config_reason(config)
    if reason is not None:
        return reason
    spec = ActivationSpec.from_config(config)
    if spec.fused_code is None:
        return f"the fused kernel does not know the activation {config.activation_func!r}"
    if getattr(config, "bias_activation_fusion", False):
        # Megatron's fused paths: swiglu and geglu only, and they ignore clamp and offset.
        known = spec.gated and config.activation_func in (F.silu, F.gelu)
        if not known or spec.clamp is not None or spec.glu_offset != 0.0:
            return ("bias_activation_fusion with an activation Megatron's fused kernels do not "
                    "compute alike")
    from megatron_eps.experts.triton_kernels import triton_unavailable_reason

    return triton_unavailable_reason()


def _process_group_size(group) -> int:
    if group is None:
        return 1
    try:
        return group.size()
    except Exception:  # noqa: BLE001 - not a usable process group: treat as collective-bearing
        return 2


class SharedOutput:
    """The shared experts' output; on a side stream, ``join()`` orders the current stream
    after it first."""

    def __init__(self, output: torch.Tensor, done=None):
        self._output = output
        self._done = done

    def join(self) -> torch.Tensor:
        if self._done is not None:
            torch.cuda.current_stream().wait_event(self._done)
            self._output.record_stream(torch.cuda.current_stream())
            self._done = None
        return self._output


class SharedExpertRunner:
    """Runs one layer's shared experts (a Megatron SharedExpertMLP): ``issue(hidden_states)``."""

    # One side stream per process (per device), shared by every layer: layers run one at a time.
    _streams: dict = {}

    def __init__(self, module):
        self.module = module
        self.reason = fused_path_reason(module)
        self.spec = ActivationSpec.from_config(module.config) if self.reason is None else None
        self.collective_free = _process_group_size(getattr(module, "tp_group", None)) == 1

    def fused(self, hidden_states: torch.Tensor) -> bool:
        """Whether this call takes fc1 -> fused activation -> fc2 (else the module's forward)."""
        if self.reason is not None:
            return False
        if hidden_states.is_cuda:
            return True
        from megatron_eps.experts.triton_kernels import interpreter_active

        return interpreter_active()

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The shared experts' output [.., H] on the current stream."""
        if not self.fused(hidden_states):
            return self.module(hidden_states)
        from megatron_eps.experts.triton_kernels import fused_activation

        module = self.module
        fc1_out, fc1_bias = module.linear_fc1(hidden_states)
        if fc1_bias is not None:
            fc1_out = fc1_out + fc1_bias
        lead = fc1_out.shape[:-1]
        activated = fused_activation(fc1_out.reshape(-1, fc1_out.shape[-1]), None, self.spec)
        # SharedExpertMLP.forward drops fc2's bias too (skip_bias_add; biases are refused).
        output, _ = module.linear_fc2(activated.view(*lead, activated.shape[-1]))
        return output

    def issue(self, hidden_states: torch.Tensor, side_stream: bool = False) -> SharedOutput:
        """Issue the shared experts; their output comes from ``join()`` of the result.
        ``side_stream``: on a stream of their own (GPUs, when they run no collective); else on
        the current stream, in issue order."""
        stream = self._stream_for(hidden_states) if side_stream else None
        if stream is None:
            return SharedOutput(self(hidden_states))
        stream.wait_stream(torch.cuda.current_stream())
        hidden_states.record_stream(stream)
        with torch.cuda.stream(stream):
            output = self(hidden_states)
            done = stream.record_event()
        return SharedOutput(output, done)

    def _stream_for(self, hidden_states: torch.Tensor):
        if not (hidden_states.is_cuda and self.collective_free):
            return None
        if torch.cuda.is_current_stream_capturing():
            return None
        device = hidden_states.device
        stream = SharedExpertRunner._streams.get(device)
        if stream is None:
            stream = SharedExpertRunner._streams[device] = torch.cuda.Stream(device=device)
        return stream
