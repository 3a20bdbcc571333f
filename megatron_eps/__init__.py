"""megatron-eps: EPS-MoE expert pipeline scheduling for Megatron-Core MoE prefill inference.

Public API:
    EPSConfig                   settings (dataclass; from_yaml / from_args)
    add_eps_args                --eps-* arguments (Megatron extra_args_provider)
    EPSAlltoAllTokenDispatcher  pipelined subclass of Megatron's MoEAlltoAllTokenDispatcher
    EPSMoELayer                 MoELayer subclass running the pipelined forward
    apply_eps                   swap EPSMoELayer into a GPT layer/block spec
"""

# First, so that Megatron-Core's notices about optional dependencies, printed when it is
# imported, are filtered (megatron_eps.known_notices lists them and says why).
from megatron_eps.known_notices import silence_known_notices

silence_known_notices()

from megatron_eps.arguments import add_eps_args  # noqa: E402
from megatron_eps.config import EPSConfig, EPSConfigError  # noqa: E402

from megatron_eps.provenance import __version__  # noqa: E402 - the one definition


def __getattr__(name):
    # Megatron-Core is imported lazily so that `import megatron_eps` (config, flags) stays cheap.
    if name == "EPSAlltoAllTokenDispatcher":
        from megatron_eps.pipeline.dispatcher import EPSAlltoAllTokenDispatcher

        return EPSAlltoAllTokenDispatcher
    if name == "EPSMoELayer":
        from megatron_eps.moe_layer import EPSMoELayer

        return EPSMoELayer
    if name == "EXPERT_KERNELS":  # read from the backend registry each time
        from megatron_eps import config

        return config.EXPERT_KERNELS
    if name == "apply_eps":
        from megatron_eps.spec import apply_eps

        return apply_eps
    raise AttributeError(f"module 'megatron_eps' has no attribute {name!r}")


__all__ = [
    "EPSConfig",
    "EPSConfigError",
    "EXPERT_KERNELS",
    "add_eps_args",
    "EPSAlltoAllTokenDispatcher",
    "EPSMoELayer",
    "apply_eps",
]
