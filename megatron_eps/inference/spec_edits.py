"""Edits of a Megatron-Core layer spec for inference without Transformer Engine: another core
attention, and torch norms that accept sequence parallelism."""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

from megatron_eps.spec import map_spec


class SequenceParallelTorchNorm:
    """Megatron's WrappedTorchNorm (torch LayerNorm/RMSNorm, used without TE/Apex) for
    sequence-parallel *inference*.

    WrappedTorchNorm asserts ``not config.sequence_parallel`` because it cannot all-reduce the
    norm weight gradients across the TP group; a norm is per token, so the forward is the same
    with sequence parallelism. Tensor-parallel attention + expert-parallel MoE needs sequence
    parallelism in Megatron-Core, hence this stand-in (inference only: weights are not
    synchronised in training).
    """

    def __new__(cls, config, *args, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        return WrappedTorchNorm(cfg, *args, **kwargs)


def replace_torch_norm(spec: Any) -> Any:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return map_spec(spec, lambda node: SequenceParallelTorchNorm if node is WrappedTorchNorm else None)


def replace_core_attention(spec: Any, core_attention_cls: type) -> Any:
    """Return a copy of a layer/block spec whose attention uses ``core_attention_cls``."""
    replaced = [0]

    def visit(node):
        if isinstance(node, list):
            return [visit(n) for n in node]
        if isinstance(node, tuple):
            return tuple(visit(n) for n in node)
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            changes = {}
            for f in dataclasses.fields(node):
                value = getattr(node, f.name)
                if f.name == "core_attention" and value is not None:
                    changes[f.name] = core_attention_cls
                    replaced[0] += 1
                    continue
                new_value = visit(value)
                if new_value is not value:
                    changes[f.name] = new_value
            return dataclasses.replace(node, **changes) if changes else node
        # ModuleSpec is a dataclass; functools.partial specs (0.18+) carry submodules in kwargs.
        if isinstance(node, functools.partial):
            kw = dict(node.keywords)
            changed = False
            for key, value in kw.items():
                new_value = visit(value)
                if new_value is not value:
                    kw[key] = new_value
                    changed = True
            return functools.partial(node.func, *node.args, **kw) if changed else node
        return node

    result = visit(spec)
    if replaced[0] == 0:
        raise ValueError("replace_core_attention: the spec has no core_attention submodule")
    return result
