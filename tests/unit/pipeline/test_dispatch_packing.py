"""Routing weights ride in extra columns of the dispatched rows (one all-to-all per chunk)."""

import pytest
import torch

from megatron_eps.comm.base import row_probs
from megatron_eps.pipeline.rows.per_pair import probs_columns
from megatron_eps.row_kernels import scatter_routed_rows


@pytest.mark.parametrize(
    "token_dtype,prob_dtype,hidden,columns",
    [
        (torch.bfloat16, torch.float32, 64, 8),
        (torch.float32, torch.float32, 32, 4),
        (torch.float32, torch.float64, 32, 4),
        (torch.bfloat16, torch.float64, 64, 8),
        (torch.float16, torch.float32, 6, 8),
        (torch.float32, torch.float64, 3, 0),  # the weight's bytes would sit misaligned
    ],
)
def test_pack_and_read_back(token_dtype, prob_dtype, hidden, columns):
    tokens = torch.randn(9, hidden).to(token_dtype)
    probs = torch.rand(9, 5, dtype=prob_dtype)
    assert probs_columns(tokens, probs) == columns
    if not columns:
        return
    assert (columns * tokens.element_size()) % 16 == 0
    gen = torch.Generator().manual_seed(0)
    sorted_indices = torch.randint(0, 9, (13,), generator=gen)
    permuted_probs = torch.rand(13, dtype=prob_dtype, generator=gen)
    packed = tokens.new_empty((13, hidden + columns))
    scatter_routed_rows(tokens, sorted_indices, permuted_probs, packed, columns)
    assert packed.shape == (13, hidden + columns)
    assert torch.equal(packed[:, :hidden], tokens[sorted_indices])
    assert torch.equal(row_probs(packed, hidden, prob_dtype), permuted_probs)  # bit-exact
    # Regrouping whole rows keeps each weight with its row.
    order = torch.randperm(13, generator=gen)
    assert torch.equal(row_probs(packed[order], hidden, prob_dtype), permuted_probs[order])
