"""The few CUDA calls the copy-engine transport needs that torch does not expose, via cuda-bindings.

* ``memcpy_batch``: many device-to-device copies in one ``cudaMemcpyBatchAsync`` call, hinted
  to overlap with compute (so the driver keeps them on the copy engines). Issuing one
  ``cudaMemcpyAsync`` per (peer, expert) from Python costs host time per call, and there are
  ``experts x peers`` copies per direction and forward.
  Falls back to one ``cudaMemcpyAsync`` per copy where the batched call is missing.
* ``stream_write_u32`` / ``stream_wait_geq_u32``: stream memory operations (no kernel, no SM).
"""

from __future__ import annotations

import functools

import numpy as np


class CudaCallError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def _modules():
    from cuda.bindings import driver, runtime

    return driver, runtime


def available() -> bool:
    try:
        _modules()
    except ImportError:
        return False
    return True


def _check(result, what: str):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise CudaCallError(f"{what} failed: {err!r}")
    return result


@functools.lru_cache(maxsize=None)
def _batch_attributes():
    """The one attribute set of every batched copy, or None without the batched API."""
    _, runtime = _modules()
    if not hasattr(runtime, "cudaMemcpyBatchAsync"):
        return None
    attrs = runtime.cudaMemcpyAttributes()
    attrs.srcAccessOrder = runtime.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
    attrs.flags = runtime.cudaMemcpyFlags.cudaMemcpyFlagPreferOverlapWithCompute
    return attrs


_use_batch = True
_batch_refused = None  # the error of the batched call that sent later copies one by one


def memcpy_batch(dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: int) -> None:
    """Copy ``sizes[i]`` bytes from device address ``srcs[i]`` to ``dsts[i]`` on ``stream``
    (stream order as a whole; no order among the copies of one call)."""
    global _use_batch
    driver, runtime = _modules()
    count = len(sizes)
    if count == 0:
        return
    dst_list, src_list, size_list = dsts.tolist(), srcs.tolist(), sizes.tolist()
    # The batched call refuses the legacy default stream (handle 0): copies issued there go
    # one by one, without giving up the batched call for the other streams.
    attrs = _batch_attributes() if _use_batch and stream != 0 else None
    if attrs is not None:
        result = runtime.cudaMemcpyBatchAsync(
            dst_list, src_list, size_list, count, [attrs], [0], 1, stream
        )
        err = result[0] if isinstance(result, tuple) else result
        if int(err) == 0:
            return
        # Not supported by this driver/device pair (or these pointers): per-copy calls from now
        # on, with one log line, and the reason kept for the benchmarks' metadata.
        global _batch_refused
        _use_batch, _batch_refused = False, repr(err)
        import logging

        logging.getLogger(__name__).info(
            "cudaMemcpyBatchAsync refused (%s): one cudaMemcpyAsync per copy from now on", err)
    kind = runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    for dst, src, size in zip(dst_list, src_list, size_list):
        _check(runtime.cudaMemcpyAsync(dst, src, size, kind, stream), "cudaMemcpyAsync")


def batch_copies_in_use() -> bool:
    return _use_batch and _batch_attributes() is not None


def copy_issue_mode() -> str:
    """How the copies went out so far, for a benchmark's metadata: ``batched``, or one
    ``cudaMemcpyAsync`` per copy and why."""
    if not available():
        return "no cuda-bindings"
    if batch_copies_in_use():
        return "batched (cudaMemcpyBatchAsync)"
    why = _batch_refused or "this CUDA runtime has no cudaMemcpyBatchAsync"
    return f"one cudaMemcpyAsync per copy ({why})"


def stream_write_u32(stream: int, address: int, value: int) -> None:
    """After the stream's earlier work (and a memory fence): ``*address = value``."""
    driver, _ = _modules()
    _stream_value_op(driver.cuStreamWriteValue32, stream, address, value,
                     driver.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)


def stream_wait_geq_u32(stream: int, address: int, value: int) -> None:
    """The stream's later work waits until ``*address >= value``."""
    driver, _ = _modules()
    _stream_value_op(driver.cuStreamWaitValue32, stream, address, value,
                     driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)


def _stream_value_op(op, stream: int, address: int, value: int, flags) -> None:
    driver, _ = _modules()
    _check(op(driver.CUstream(stream), driver.CUdeviceptr(address), value & 0xFFFFFFFF, flags),
           getattr(op, "__name__", "stream memory operation"))


# ------------------------------------------------------------ CUDA IPC (ranks sharing a GPU)
def device_malloc(nbytes: int) -> int:
    """A fresh ``cudaMalloc`` allocation (outside torch's caching allocator, so that its IPC
    handle covers exactly it)."""
    _, runtime = _modules()
    return int(_check(runtime.cudaMalloc(nbytes), "cudaMalloc")[1])


def device_free(address: int) -> None:
    _, runtime = _modules()
    _check(runtime.cudaFree(address), "cudaFree")


def ipc_export(address: int) -> bytes:
    """The 64-byte IPC handle of a ``device_malloc`` allocation, for another process."""
    _, runtime = _modules()
    handle = _check(runtime.cudaIpcGetMemHandle(address), "cudaIpcGetMemHandle")[1]
    return bytes(handle.reserved)


def ipc_open(handle_bytes: bytes) -> int:
    """This process's address of another process's allocation (``ipc_export``'s bytes)."""
    _, runtime = _modules()
    handle = runtime.cudaIpcMemHandle_t()
    handle.reserved = handle_bytes
    return int(_check(runtime.cudaIpcOpenMemHandle(handle, runtime.cudaIpcMemLazyEnablePeerAccess),
                      "cudaIpcOpenMemHandle")[1])


def ipc_close(address: int) -> None:
    _, runtime = _modules()
    _check(runtime.cudaIpcCloseMemHandle(address), "cudaIpcCloseMemHandle")
