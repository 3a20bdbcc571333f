"""Triton kernels of the expert computation: a load-aware grouped GEMM and a fused activation.

Grouped GEMM (``expert_gemm``)
    out[rows of e] = epilogue(x[rows of e] @ w[e]^T) for every expert e in one launch.
    Work items are (m-tile, n-tile) pairs where an m-tile is BLOCK_M consecutive rows of ONE
    expert, so an expert with 6000 rows simply owns 47 m-tiles and an empty expert owns none.
    Each CTA derives the m-tiles' experts and rows from the experts' cumulative row ends (the
    ``offs`` torch._grouped_mm takes) with one prefix sum over the experts; the host only counts
    the m-tiles for the grid, so a launch costs no per-call table and no extra copy. A
    persistent grid of about one CTA per SM walks the flat list of work items with a stride of
    the grid size, so a skewed load (one hot expert) still spreads over every SM, and the tail
    is at most one tile per SM. Tiles are visited in GROUP_M-swizzled order so CTAs
    running at the same time share weight tiles (and x tiles) in L2.
    bf16 (or fp16/fp32) operands, fp32 accumulation.
    fc1 epilogue (GATED): each tile computes the gate columns [n, n+BN) and the matching linear
    columns [F+n, F+n+BN) as two accumulators, then act(gate) * (lin + offset) * probs in fp32 and
    stores only [M, F]: the fc1 output [M, 2F] never goes to memory.

Fused activation (``fused_activation``)
    The same epilogue as a standalone elementwise kernel for the grouped/dense backends.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from megatron_eps.triton_launch import CachedLauncher

try:  # Triton is optional: the triton backend reports itself unavailable without it.
    import triton
    import triton.language as tl

    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
    triton = None
    tl = None
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def triton_available() -> bool:
    return triton is not None


def triton_unavailable_reason() -> Optional[str]:
    return None if triton is not None else f"triton does not import ({_TRITON_ERROR})"


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _activation(x, ACT: tl.constexpr):
        # ACT codes: see megatron_eps.experts.activation (ACT_*).
        y = x
        if ACT == 1:  # silu
            y = x * tl.sigmoid(x)
        if ACT == 2:  # exact (erf) gelu, as F.gelu
            y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        if ACT == 3:  # relu
            y = tl.maximum(x, 0.0)
        if ACT == 4:  # squared relu
            r = tl.maximum(x, 0.0)
            y = r * r
        if ACT == 5:  # quick gelu
            y = x * tl.sigmoid(1.702 * x)
        return y

    @triton.jit
    def _glu_epilogue(gate, lin, clamp, glu_offset, ACT: tl.constexpr, HAS_CLAMP: tl.constexpr):
        if HAS_CLAMP:
            gate = tl.minimum(gate, clamp)
            lin = tl.minimum(tl.maximum(lin, -clamp), clamp)
        return _activation(gate, ACT) * (lin + glu_offset)

    @triton.jit
    def _tile_ends(offs_ptr, num_experts, BLOCK_M: tl.constexpr, EXPERTS_POW2: tl.constexpr):
        """[EXPERTS_POW2] cumulative m-tile count at the end of each expert, from the experts'
        cumulative row ends (0 past the last expert)."""
        e = tl.arange(0, EXPERTS_POW2)
        ends = tl.load(offs_ptr + e, mask=e < num_experts, other=0)
        starts = tl.load(offs_ptr + e - 1, mask=(e > 0) & (e < num_experts), other=0)
        return tl.cumsum((ends - starts + BLOCK_M - 1) // BLOCK_M, 0)

    @triton.jit
    def _work_item(tile, tile_ends, offs_ptr, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr,
                   BLOCK_M: tl.constexpr):
        """(n-tile, expert, first row, end row) of work item ``tile``: a GROUP_M swizzle over the
        global m-tile list (which may cross expert boundaries), so neighbouring items share
        weight tiles. The m-tile's expert is the number of experts whose tiles end at or before
        it (an empty expert ends where the one before it does)."""
        tiles_per_group = GROUP_M * num_n_tiles
        first_m = (tile // tiles_per_group) * GROUP_M
        group_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
        in_group = tile % tiles_per_group
        m_tile = first_m + in_group % group_m
        done = tile_ends <= m_tile
        expert = tl.sum(done.to(tl.int32), 0)
        expert_first_tile = tl.max(tl.where(done, tile_ends, 0), 0)
        expert_first_row = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
        row_start = expert_first_row + (m_tile - expert_first_tile) * BLOCK_M
        row_end = tl.load(offs_ptr + expert)
        return in_group // group_m, expert, row_start, row_end

    @triton.jit
    def _store_tile(acc, acc_lin, out_ptr, probs_ptr, rows_in, row_ok, cols, col_ok, stride_om,
                    clamp, glu_offset, GATED: tl.constexpr, ACT: tl.constexpr,
                    HAS_PROBS: tl.constexpr, HAS_CLAMP: tl.constexpr):
        """The epilogue of one tile: activation (GLU with the linear half when gated), routing
        probs, then the store of the rows and columns in range."""
        if GATED:
            result = _glu_epilogue(acc, acc_lin, clamp, glu_offset, ACT, HAS_CLAMP)
        else:
            result = _activation(acc, ACT)
        if HAS_PROBS:
            p = tl.load(probs_ptr + rows_in).to(tl.float32)
            result = result * p[:, None]
        out_ptrs = out_ptr + rows_in[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _accumulate_pointer_loads(x_ptr, w_ptr, rows_in, cols_in, expert, K, gate_rows, stride_xm,
                                  stride_xk, stride_we, stride_wn, stride_wk, GATED: tl.constexpr,
                                  IEEE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """A tile's accumulators (gate and linear halves) from pointer loads. Out-of-range
        rows/cols arrive as a valid row/col (``rows_in``/``cols_in``), so the K loop needs no
        row/col masks; the junk lands only in rows/cols never stored."""
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows_in[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w_ptr + expert * stride_we + cols_in[None, :] * stride_wn + ks[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_lin = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_ok = ks < K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            if GATED:
                # The linear half's rows sit gate_rows (= F) below the gate rows.
                if EVEN_K:
                    b_lin = tl.load(w_ptrs + gate_rows * stride_wn)
                else:
                    b_lin = tl.load(w_ptrs + gate_rows * stride_wn, mask=k_ok[:, None], other=0.0)
                if IEEE:
                    acc_lin = tl.dot(a, b_lin, acc_lin, input_precision="ieee")
                else:
                    acc_lin = tl.dot(a, b_lin, acc_lin)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        return acc, acc_lin

    @triton.jit
    def _accumulate_tma_loads(x_desc, w_desc, row_start, w_row, K, gate_rows, GATED: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """A tile's accumulators from TMA loads (Hopper's bulk tensor copies). Rows past the
        expert's end are whatever follows in x (or TMA's zero fill past the tensor), likewise
        weight rows past the n range: computed, never stored. K past the end is zero-filled."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_lin = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = x_desc.load([row_start, k * BLOCK_K])
            b = w_desc.load([w_row, k * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
            if GATED:
                b_lin = w_desc.load([w_row + gate_rows, k * BLOCK_K])
                acc_lin = tl.dot(a, b_lin.T, acc_lin)
        return acc, acc_lin

    # Ints that change with the load are not specialized on (Triton would compile a variant per
    # value class: == 1, multiple of 16, other), so a new load never costs a compile mid-run.
    @triton.jit(do_not_specialize=["num_experts", "num_m_tiles", "num_programs"])
    def _expert_gemm_kernel(
        x_src,
        w_src,
        out_ptr,
        probs_ptr,
        offs_ptr,
        num_experts,
        num_m_tiles,
        N,
        K,
        w_rows_per_expert,
        gate_rows,
        stride_xm,
        stride_xk,
        stride_we,
        stride_wn,
        stride_wk,
        stride_om,
        clamp,
        glu_offset,
        num_programs,
        GATED: tl.constexpr,
        ACT: tl.constexpr,
        HAS_PROBS: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        IEEE: tl.constexpr,
        EVEN_K: tl.constexpr,
        TMA: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EXPERTS_POW2: tl.constexpr,
        TILES_ON_DEVICE: tl.constexpr,
    ):
        # x_src/w_src are TMA descriptors (TMA) or pointers with their strides (otherwise; the
        # strides are unused with descriptors, w_rows_per_expert unused with pointers).
        pid = tl.program_id(0)
        num_n_tiles = tl.cdiv(N, BLOCK_N)
        tile_ends = _tile_ends(offs_ptr, num_experts, BLOCK_M, EXPERTS_POW2)
        if TILES_ON_DEVICE:
            # The host passed a bound (its rows per expert stay on the device): the m-tiles
            # are counted here, and the grid's programs past them find no work.
            num_m_tiles = tl.max(tile_ends, 0)
        num_tiles = num_m_tiles * num_n_tiles
        for tile in range(pid, num_tiles, num_programs):
            n_tile, expert, row_start, row_end = _work_item(
                tile, tile_ends, offs_ptr, num_m_tiles, num_n_tiles, GROUP_M, BLOCK_M)
            rows = row_start + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            rows_in = tl.where(row_ok, rows, row_end - 1).to(tl.int64)
            cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            cols_in = tl.where(col_ok, cols, N - 1).to(tl.int64)
            if TMA:
                acc, acc_lin = _accumulate_tma_loads(
                    x_src, w_src, row_start, expert * w_rows_per_expert + n_tile * BLOCK_N, K,
                    gate_rows, GATED, BLOCK_M, BLOCK_N, BLOCK_K)
            else:
                acc, acc_lin = _accumulate_pointer_loads(
                    x_src, w_src, rows_in, cols_in, expert.to(tl.int64), K, gate_rows, stride_xm,
                    stride_xk, stride_we, stride_wn, stride_wk, GATED, IEEE, EVEN_K, BLOCK_M,
                    BLOCK_N, BLOCK_K)
            _store_tile(acc, acc_lin, out_ptr, probs_ptr, rows_in, row_ok, cols_in, col_ok, stride_om,
                        clamp, glu_offset, GATED, ACT, HAS_PROBS, HAS_CLAMP)

    @triton.jit(do_not_specialize=["M"])
    def _fused_activation_kernel(
        in_ptr,
        probs_ptr,
        out_ptr,
        M,
        F,
        stride_in,
        stride_out,
        clamp,
        glu_offset,
        GATED: tl.constexpr,
        ACT: tl.constexpr,
        HAS_PROBS: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows < M)[:, None] & (cols < F)[None, :]
        in_ptrs = in_ptr + rows.to(tl.int64)[:, None] * stride_in + cols[None, :]
        gate = tl.load(in_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            lin = tl.load(in_ptrs + F, mask=mask, other=0.0).to(tl.float32)
            result = _glu_epilogue(gate, lin, clamp, glu_offset, ACT, HAS_CLAMP)
        else:
            result = _activation(gate, ACT)
        if HAS_PROBS:
            p = tl.load(probs_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)
            result = result * p[:, None]
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- host side


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch settings of one expert_gemm launch."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    # Persistent: about one CTA per SM loops over work items; else one CTA per work item.
    persistent: bool = True
    ctas_per_sm: int = 1
    # Load operands with TMA tensor descriptors (Hopper+) instead of pointer loads.
    tma: bool = False


# Chooses (fc1 config, fc2 config) from the row counts; replaceable for tuning sweeps.
ConfigChooser = Callable[[Sequence[int], int, int, bool], Tuple[GemmConfig, GemmConfig]]


def default_configs(counts: Sequence[int], hidden: int, ffn: int, gated: bool):
    """Tile configs by load, tuned on H100 bf16 (benchmarks/tune_triton.py; docs/kernels.md).

    TMA operand loads were 2.2-2.9x faster than pointer loads at >= 256 tokens/expert in that
    sweep (same tiles, both on wgmma); 128x(2x128) fc1 tiles and 128x256 fc2 tiles won at
    >= 256 tokens/expert, 64-row tiles at <= 32 (less padding when experts hold few rows).
    Where TMA cannot be used (pre-Hopper, misaligned rows) expert_gemm falls back to pointer
    loads with narrower tiles (see _pointer_fallback).
    """
    busy = [c for c in counts if c]
    mean_rows = sum(busy) / max(len(busy), 1)
    if mean_rows <= 32:
        # Weight-bound: one CTA per work item (not persistent) keeps more weight tiles in
        # flight; on the H200 this was 7-17% faster at 5 of 6 points of three widths at 8 and
        # 32 rows per expert, 8% slower at one (benchmarks/results/experts/tune_triton_h200.txt).
        fc1 = GemmConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4, tma=True,
                         persistent=False)
        fc2 = GemmConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, tma=True,
                         persistent=False)
    else:
        fc1 = GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, tma=True)
        fc2 = GemmConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3, tma=True)
    return fc1, fc2


def _pointer_fallback(cfg: GemmConfig, gated: bool) -> GemmConfig:
    """The pointer-load kernel keeps its operands' addresses in registers: narrower tiles
    (128x64 per half for fc1, 128x128 for fc2; 255 registers and spills otherwise)."""
    return dataclasses.replace(cfg, tma=False, block_n=min(cfg.block_n, 64 if gated else 128), num_stages=4)


_CHOOSER: Dict[str, ConfigChooser] = {"fn": default_configs}


def set_config_chooser(chooser: Optional[ConfigChooser]) -> None:
    """Install a different tile-config chooser (benchmark sweeps); None restores the default."""
    _CHOOSER["fn"] = chooser or default_configs


def choose_configs(counts, hidden, ffn, gated):
    return _CHOOSER["fn"](counts, hidden, ffn, gated)


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _gemm_sm_count(device_index: int) -> int:
    """SMs a persistent GEMM may fill: all of them less the carve-out torch's GEMMs honour
    (sm_control.gemm_sm_carveout), so comm kernels keep SMs of their own."""
    from megatron_eps.comm.sm_control import current_gemm_carveout

    carveout = current_gemm_carveout() or 0
    return max(1, _sm_count(device_index) - carveout)


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv is a constexpr function in Triton 3.6: microseconds per host call.
    return -(-a // b)


def m_tile_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """The most m-tiles ``num_rows`` rows over ``num_experts`` experts can take, whatever the
    split (each expert adds at most one partly filled tile)."""
    return min(_cdiv(num_rows, block_m) + num_experts, num_rows)


def count_m_tiles(counts: Sequence[int], block_m: int) -> int:
    """Number of m-tiles (BLOCK_M rows of one expert) of a load: the kernels' work-item count
    per n-tile. The kernels find each tile's expert from the row offsets themselves."""
    return sum((c + block_m - 1) // block_m for c in counts)


@functools.lru_cache(maxsize=None)
def _gemm_launchers() -> Dict[str, CachedLauncher]:
    """The GEMM kernel launches twice per expert call; these skip the JIT's per-call binding and
    specialization of every argument after a specialization's first launch. One launcher per
    operand-load flavour, so the compiled kernels of each can be listed apart."""
    return {"pointer": CachedLauncher(_expert_gemm_kernel),
            "tma": CachedLauncher(_expert_gemm_kernel)}


def compiled_gemm_kernels() -> Dict[str, list]:
    """The compiled GEMM kernels of each flavour, by launch (registers/spills/PTX for tuning)."""
    return {flavour: launcher.compiled_kernels() for flavour, launcher in _gemm_launchers().items()}


@functools.lru_cache(maxsize=16)
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def expert_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    num_m_tiles: int,
    cfg: GemmConfig,
    out: Optional[torch.Tensor] = None,
    gated: bool = False,
    act_code: int = 0,
    probs: Optional[torch.Tensor] = None,
    clamp: Optional[float] = None,
    glu_offset: float = 0.0,
    tiles_on_device: bool = False,
) -> torch.Tensor:
    """out[rows of e] = epilogue(x[rows of e] @ w[e]^T); w is [n, N_rows, K] (N_rows = 2N if
    gated), offs the int32 [n] cumulative row ends (gemm_common.expert_offsets), num_m_tiles
    count_m_tiles(counts, cfg.block_m). ``tiles_on_device``: num_m_tiles is only a bound
    (``m_tile_bound``; the host does not know the rows per expert) and the kernel counts the
    m-tiles from ``offs`` itself."""
    rows, K = x.shape
    n_rows = w.shape[1]
    N = n_rows // 2 if gated else n_rows
    if out is None:
        out = x.new_empty(rows, N)
    if num_m_tiles == 0:
        return out
    num_work = num_m_tiles * _cdiv(N, cfg.block_n)
    device_index = x.device.index or 0
    gemm_sms = _gemm_sm_count(device_index) if x.is_cuda else 0
    if not cfg.persistent and x.is_cuda and gemm_sms < _sm_count(device_index):
        cfg = dataclasses.replace(cfg, persistent=True)  # only a persistent grid leaves SMs free
    if cfg.persistent and x.is_cuda:
        grid_size = min(num_work, gemm_sms * cfg.ctas_per_sm)
    elif cfg.persistent:  # interpreter: a few programs still exercise the persistent loop
        grid_size = min(num_work, 3)
    else:
        grid_size = num_work
    shared_args = (
        out,
        probs if probs is not None else x,
        offs,
        w.shape[0],
        num_m_tiles,
        N,
        K,
    )
    scalars = (float(clamp) if clamp is not None else 0.0, float(glu_offset), grid_size)
    flags = {"GATED": gated, "ACT": act_code, "HAS_PROBS": probs is not None,
             "HAS_CLAMP": clamp is not None, "TILES_ON_DEVICE": tiles_on_device}
    tiles = {
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": cfg.group_m,
        "EXPERTS_POW2": max(16, 1 << (w.shape[0] - 1).bit_length()),
    }
    use_tma = cfg.tma and _tma_usable(x, w)
    if cfg.tma and not use_tma:
        cfg = _pointer_fallback(cfg, gated)
        tiles["BLOCK_N"] = cfg.block_n
        num_work = num_m_tiles * _cdiv(N, cfg.block_n)
        grid_size = min(num_work, grid_size) if cfg.persistent else num_work
        scalars = scalars[:2] + (grid_size,)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        sources = (TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k]),
                   TensorDescriptor.from_tensor(w.view(w.shape[0] * n_rows, K),
                                                [cfg.block_n, cfg.block_k]))
        strides = (0, 0, 0, 0, 0)
    else:
        sources = (x, w)
        strides = (x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2))
    flags["IEEE"] = x.dtype == torch.float32 and not use_tma
    flags["EVEN_K"] = K % cfg.block_k == 0
    flags["TMA"] = use_tma
    _gemm_launchers()["tma" if use_tma else "pointer"](
        (grid_size,),
        (*sources, *shared_args, n_rows, N if gated else 0, *strides, out.stride(0), *scalars),
        {**flags, **tiles},
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _tma_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """TMA needs Hopper+, contiguous rows and 16-byte aligned bases and row strides."""
    if x.is_cuda and (_capability_major(x.device.index or 0) < 9 or x.dtype == torch.float32):
        return False  # no TMA before Hopper; fp32 would run as tf32 through this path
    elem = x.element_size()
    return (
        x.stride(1) == 1
        and (x.stride(0) * elem) % 16 == 0
        and x.data_ptr() % 16 == 0
        and w.is_contiguous()
        and (w.shape[2] * elem) % 16 == 0
        and w.data_ptr() % 16 == 0
    )


@functools.lru_cache(maxsize=None)
def _fused_activation_launcher():
    """The activation kernel is launched once per chunk, on the pipeline's critical path."""
    return CachedLauncher(_fused_activation_kernel)


def fused_activation(fc1_out: torch.Tensor, probs: Optional[torch.Tensor], spec) -> torch.Tensor:
    """spec's activation (and probs) of fc1_out [M, F1] -> [M, F] in one elementwise kernel."""
    rows, f1 = fc1_out.shape
    width = f1 // 2 if spec.gated else f1
    out = fc1_out.new_empty(rows, width)
    if rows == 0 or width == 0:
        return out
    if fc1_out.stride(1) != 1:
        fc1_out = fc1_out.contiguous()
    block_m, block_f = 16, 256
    grid = (_cdiv(rows, block_m), _cdiv(width, block_f))
    _fused_activation_launcher()(
        grid,
        (
            fc1_out,
            probs if probs is not None else fc1_out,
            out,
            rows,
            width,
            fc1_out.stride(0),
            out.stride(0),
            float(spec.clamp) if spec.clamp is not None else 0.0,
            float(spec.glu_offset),
        ),
        {
            "GATED": spec.gated,
            "ACT": spec.fused_code,
            "HAS_PROBS": probs is not None,
            "HAS_CLAMP": spec.clamp is not None,
            "BLOCK_M": block_m,
            "BLOCK_F": block_f,
        },
        num_warps=4,
    )
    return out
