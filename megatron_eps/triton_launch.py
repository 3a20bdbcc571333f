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

``compile_in_background()`` turns the launches of the kernels launched through a
``CachedLauncher`` into compilations on a worker thread (Triton's async compile mode), so that
self-calibration can compile a candidate backend's kernels while the forward goes on with a
backend that is ready (a first compile costs about a second; experts/autotune.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Sequence

_LOG = logging.getLogger(__name__)

# Inside compile_in_background: the BackgroundCompile that collects the compilations started.
_COMPILING: contextvars.ContextVar = contextvars.ContextVar("megatron_eps_compiling", default=None)


@functools.lru_cache(maxsize=None)
def triton_imports() -> bool:
    """Whether Triton imports here (it is optional: the kernels' callers fall back to torch)."""
    try:
        import triton  # noqa: F401 - only whether it imports
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


@functools.lru_cache(maxsize=None)
def _async_compile():
    """Triton's async-compile module, or None where this Triton lacks it."""
    try:
        from triton.runtime import _async_compile as module
    except Exception:  # noqa: BLE001 - an older or absent Triton: compile in the foreground
        return None
    needed = ("AsyncCompileMode", "FutureKernel", "active_mode")
    return module if all(hasattr(module, name) for name in needed) else None


@functools.lru_cache(maxsize=None)
def _compile_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="megatron-eps-triton-compile")


def _set_active_mode(module, mode) -> None:
    if isinstance(module.active_mode, contextvars.ContextVar):
        module.active_mode.set(mode)
    else:
        module.active_mode = mode


def _build_launcher(compile_future) -> None:
    """Build the compiled kernel's host launcher, a C extension Triton otherwise compiles (and
    caches on disk) at the kernel's first launch, in the caller's thread. Built here, on the
    compile worker, the first launch finds it in Triton's cache. (Before, a cold first run spent
    305 ms calibrating, results/experts/autotune_overhead_h200_e89e830.json; with it, 39 ms,
    results/experts/autotune_overhead_h200.json.)"""
    kernel = compile_future.result()
    from triton.runtime.driver import driver

    driver.active.launcher_cls(kernel.src, kernel.metadata)


class BackgroundCompile:
    """Compilations started by ``compile_in_background``: each kernel's compilation, then its
    launcher's, on the one compile worker."""

    def __init__(self):
        self.kernels: List[Any] = []
        self.launchers: List[Any] = []

    def add(self, future_kernel) -> None:
        self.kernels.append(future_kernel)
        # The worker runs tasks in order, so this one starts once the compilation has finished.
        self.launchers.append(_compile_pool().submit(_build_launcher, future_kernel.future))

    def done(self) -> bool:
        compiled = all(getattr(k, "future", None) is None or k.future.done() for k in self.kernels)
        return compiled and all(f.done() for f in self.launchers)

    def wait(self) -> None:
        """Block until compiled and install the kernels (raises a compilation error). A launcher
        that failed to build here is built at the first launch instead."""
        for kernel in self.kernels:
            kernel.result()
        for launcher in self.launchers:
            try:
                launcher.result()
            except Exception as exc:  # noqa: BLE001 - the first launch builds it then
                _LOG.debug("building a Triton launcher in the background failed: %s", exc)


@contextlib.contextmanager
def compile_in_background():
    """Within it, ``CachedLauncher`` calls start a compilation of their kernel's
    specialization on a worker thread instead of launching it (outputs are left unwritten).
    Yields a ``BackgroundCompile`` of what was started (empty where every kernel was compiled
    already), or None where Triton has no async compile mode (nothing is compiled or run then;
    the caller compiles in the foreground)."""
    module = _async_compile()
    if module is None or os.environ.get("TRITON_INTERPRET") == "1":
        yield None
        return
    started = BackgroundCompile()
    token = _COMPILING.set(started)
    _set_active_mode(module, module.AsyncCompileMode(_compile_pool()))
    try:
        yield started
    finally:
        _set_active_mode(module, None)
        _COMPILING.reset(token)


def _start_compile(started: BackgroundCompile, compiled) -> None:
    module = _async_compile()
    if module is not None and isinstance(compiled, module.FutureKernel) and compiled.kernel is None:
        started.add(compiled)


def _arg_key(value: Any):
    kind = type(value)
    if kind is int:
        return (value == 1, value % 16 == 0, -(2**31) <= value < 2**31)
    if kind is float:
        return "float"
    if kind is bool:
        return ("bool", value)
    if value is None:
        return None
    if hasattr(value, "data_ptr"):
        return (value.dtype, value.data_ptr() % 16 == 0, value.get_device())
    if hasattr(value, "block_shape") and hasattr(value, "base"):  # a host TMA descriptor
        return ("desc", value.base.dtype, tuple(value.block_shape), value.base.data_ptr() % 16 == 0)
    return (kind.__name__,)


class CachedLauncher:
    """``launcher(grid, runtime_args, constexprs, **options)`` == ``kernel[grid](*runtime_args,
    **constexprs, **options)``, with the JIT dispatch skipped after the first call of each
    specialization. ``runtime_args`` are the kernel's leading parameters, in order;
    ``constexprs`` its remaining (constexpr) parameters, in signature order; ``options`` the
    launch options (num_warps, num_stages), which must not change between calls of one key."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.name = (getattr(kernel, "__name__", None)
                     or getattr(getattr(kernel, "fn", None), "__name__", "kernel"))
        self._compiled: Dict[tuple, Any] = {}
        self.direct = True

    def __call__(self, grid, runtime_args: Sequence, constexprs: Dict[str, Any], **options):
        started = _COMPILING.get()
        if started is not None:
            _start_compile(started, self.kernel.warmup(*runtime_args, grid=grid, **constexprs, **options))
            return
        key = tuple(map(_arg_key, runtime_args)) + tuple(constexprs.values())
        key += tuple(sorted(options.items()))
        compiled = self._compiled.get(key) if self.direct else None
        if compiled is not None:
            try:
                # A compiled kernel indexes all three grid dimensions.
                compiled[tuple(grid) + (1,) * (3 - len(grid))](*runtime_args, *constexprs.values())
                return
            except Exception as exc:  # noqa: BLE001 - an API change: keep launching through the JIT
                self.direct = False
                _LOG.warning("%s: launching the compiled kernel directly failed (%s: %s); every "
                             "launch goes through Triton's JIT from now on", self.name,
                             type(exc).__name__, exc)
        compiled = self.kernel[grid](*runtime_args, **constexprs, **options)
        if self.direct and compiled is not None and hasattr(compiled, "__getitem__"):
            self._compiled[key] = compiled

    def through_jit(self, grid, runtime_args: Sequence, constexprs: Dict[str, Any], **options):
        """The same launch through Triton's JIT, every time (Triton's CPU interpreter needs it)."""
        self.kernel[grid](*runtime_args, **constexprs, **options)

    def compiled_kernels(self) -> List[Any]:
        """The compiled kernels launched so far, one per specialization (for diagnostics)."""
        return list(self._compiled.values())
