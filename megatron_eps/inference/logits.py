"""Whether two models' logits agree: statistics reduced over every rank, and the bound."""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.distributed as dist

LOGIT_ROWS_PER_BLOCK = 2048



def compare_logits(stock: torch.Tensor, eps: torch.Tensor, dtype: str = "fp32") -> Dict[str, float]:
    """Agreement statistics of two logit tensors, reduced over all ranks when distributed."""
    # Row blocks in float64: the whole-tensor temporaries of a 32K-token prompt would be tens of
    # GB per rank.
    stock2, eps2 = stock.reshape(-1, stock.shape[-1]), eps.reshape(-1, eps.shape[-1])
    max_abs = ref_max = err_sq = ref_sq = 0.0
    finite = True
    for start in range(0, stock2.shape[0], LOGIT_ROWS_PER_BLOCK):
        ref = stock2[start : start + LOGIT_ROWS_PER_BLOCK].double()
        got = eps2[start : start + LOGIT_ROWS_PER_BLOCK].double()
        diff = got - ref
        max_abs = max(max_abs, diff.abs().max().item())
        ref_max = max(ref_max, ref.abs().max().item())
        err_sq += diff.pow(2).sum().item()
        ref_sq += ref.pow(2).sum().item()
        finite = finite and bool(torch.isfinite(got).all()) and bool(torch.isfinite(ref).all())
    stats = torch.tensor([max_abs, ref_max, err_sq, ref_sq, float(finite)], dtype=torch.float64)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_backend() == "nccl":
        stats = stats.cuda()
    # Max for the maxima, sums for the squared norms, min for finiteness (over all ranks).
    maxima = stats[[0, 1]].clone()
    sums = stats[[2, 3]].clone()
    finite = stats[[4]].clone()
    if distributed:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    max_abs, ref_max = maxima.tolist()
    err_sq, ref_sq = sums.tolist()
    return {
        "max_abs_diff": max_abs,
        "ref_max_abs": ref_max,
        "max_abs_diff_scaled": max_abs / max(1.0, ref_max),
        "rel_l2_err": math.sqrt(err_sq) / max(math.sqrt(ref_sq), 1e-30),
        "finite": bool(finite.item() > 0.5),
    }


def logits_agree(cmp: Dict[str, float], dtype: str, tol: float) -> bool:
    """fp32: max |diff| / max(1, max |ref|) <= tol; bf16/fp16: ||diff|| / ||ref|| <= tol."""
    if not cmp["finite"]:
        return False
    metric = cmp["max_abs_diff_scaled"] if dtype == "fp32" else cmp["rel_l2_err"]
    return metric <= tol

