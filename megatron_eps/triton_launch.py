"""Launch a Triton kernel without Triton's per-call JIT dispatch once it is compiled.

``kernel[grid](...)`` binds and specializes every argument, looks the kernel up in the JIT cache
and builds launch metadata on each call: tens of microseconds of host time. The pipeline issues
a few small kernels per chunk, and that host time is on its critical path (docs/pipeline.md), so
``CachedLauncher`` keeps the compiled kernel of each specialization and calls it directly.

The specialization key follows Triton's own rules for the arguments our kernels take: a tensor
by its dtype and whether its address is 16-byte aligned, an int by whether it equals 1, is a
multiple of 16, or needs 64 bits, and the constexpr values. The first launch of every key goes
through Triton's JIT (which compiles and returns the compiled kernel); a failure of the direct
call falls back to the JIT path for good.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence


def _arg_key(value: Any):
    if hasattr(value, "data_ptr"):
        return (value.dtype, value.data_ptr() % 16 == 0, value.device.index)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, not -(2**31) <= value < 2**31)
    if isinstance(value, float):
        return "float"
    if value is None:
        return None
    return (type(value).__name__,)


class CachedLauncher:
    """``launcher(grid, runtime_args, constexprs, **options)`` == ``kernel[grid](*runtime_args,
    **constexprs, **options)``, with the JIT dispatch skipped after the first call of each
    specialization. ``runtime_args`` are the kernel's leading parameters, in order;
    ``constexprs`` its remaining (constexpr) parameters, in signature order; ``options`` the
    launch options (num_warps, num_stages), which must not change between calls of one key."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: Dict[tuple, Any] = {}
        self.direct = True

    def __call__(self, grid, runtime_args: Sequence, constexprs: Dict[str, Any], **options):
        key = tuple(_arg_key(a) for a in runtime_args) + tuple(constexprs.values())
        key += tuple(sorted(options.items()))
        compiled = self._compiled.get(key) if self.direct else None
        if compiled is not None:
            try:
                compiled[grid](*runtime_args, *constexprs.values())
                return
            except Exception:  # noqa: BLE001 - an API change: keep launching through the JIT
                self.direct = False
        compiled = self.kernel[grid](*runtime_args, **constexprs, **options)
        if self.direct and compiled is not None and hasattr(compiled, "__getitem__"):
            self._compiled[key] = compiled
