"""The warnings megatron-eps silences, all in one place.

Megatron-Core and torch print these on import, on building a ``TransformerConfig`` or on an
all-gather, and none of them asks anything of a megatron-eps user:

- "Transformer Engine and Apex are not installed. Falling back to ..." (megatron.core.optimizer,
  megatron.core.distributed.fsdp): the fused optimizer and gradient kernels of training; prefill
  inference never runs them.
- "Apex is not installed. Falling back to Torch Norm" (the layer specs): the norm of a spec built
  without Transformer Engine is torch's, which is the one megatron-eps tests its layers against.
- "full scope is deprecated" (megatron.core.transformer.transformer_config): megatron-core 0.16's
  own default (``cuda_graph_scope="full"``) triggers it on every config.
- "`torch.distributed.all_gather_into_tensor` is deprecated" (torch.distributed, on the
  dispatcher's all-gather of its routing statistics): torch 2.13 renamed the collective, and the older
  torch versions megatron-eps supports have only this name.

Each filter matches the start of one message, its category and the module the warning is
attributed to, so any other warning, and an error such as "Transformer Engine is not installed"
raised where a Transformer Engine layer is asked for, still shows. Python's own warning options
win: with ``-W`` or ``PYTHONWARNINGS`` set, nothing is silenced (``python -W default`` shows
these notices).
"""

from __future__ import annotations

import re
import sys
import warnings

# (start of the message, category, module the warning is attributed to: a regex)
KNOWN_NOTICES = (
    ("Transformer Engine and Apex are not installed. Falling back to ", UserWarning,
     r"megatron\.core\."),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, r"megatron\.core\."),
    ("full scope is deprecated. ", UserWarning, r"megatron\.core\.transformer\.transformer_config"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated. ", FutureWarning,
     r"torch\.distributed\."),
)


def silence_known_notices() -> None:
    """Install one ``ignore`` filter per entry of KNOWN_NOTICES, unless the interpreter was given
    warning options (``-W``, ``PYTHONWARNINGS``). Installing them twice adds nothing."""
    if sys.warnoptions:
        return
    for message, category, module in KNOWN_NOTICES:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category,
                                module=module)
