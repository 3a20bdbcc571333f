"""The permutation kernels against brute force (CPU: the torch path; GPU: the Triton kernels)."""

import numpy as np
import pytest
import torch

from megatron_eps.row_kernels import scatter_routed_rows, sum_expert_rows, sum_rows


def slot_table(owner: torch.Tensor, num_owners: int, slots: int) -> torch.Tensor:
    """[num_owners, slots]: each owner's rows in row order, padded with owner.numel() (empty)."""
    table = torch.full((num_owners, slots), owner.numel(), dtype=torch.long)
    for row, o in enumerate(owner.tolist()):
        free = int((table[o] < owner.numel()).sum())
        table[o, free] = row
    return table.to(owner.device)


def _devices():
    gpu = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])
    return ["cpu", gpu]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,columns", [(40, 0), (40, 8), (5120, 8), (3000, 4)])
def test_scatter_routed_rows(device, dtype, hidden, columns):
    if dtype == torch.float32 and columns:
        columns = 4  # 16 bytes of fp32
    gen = torch.Generator().manual_seed(hidden + columns)
    tokens = torch.randn(37, hidden, generator=gen).to(device=device, dtype=dtype)
    num = 90
    token_index = torch.randint(0, 37, (num,), generator=gen).to(device)
    probs = torch.rand(num, generator=gen).to(device)
    width = hidden + columns
    # identity rows
    out = torch.full((num, width), float("nan"), dtype=dtype, device=device)
    scatter_routed_rows(tokens, token_index, probs, out, columns)
    assert torch.equal(out[:, :hidden], tokens[token_index])
    if columns:
        got = out[:, hidden:hidden + (1 if dtype == torch.float32 else 2)]
        assert torch.equal(got.contiguous().view(torch.float32)[:, 0], probs)
    # scattered rows into a larger buffer; untouched rows keep their contents
    dst = torch.randperm(200, generator=gen)[:num].to(device)
    big = torch.full((200, width), 7.0, dtype=dtype, device=device)
    scatter_routed_rows(tokens, token_index, probs, big, columns, dst_rows=dst)
    assert torch.equal(big[dst, :hidden], tokens[token_index])
    untouched = torch.ones(200, dtype=torch.bool, device=device)
    untouched[dst] = False
    assert bool((big[untouched] == 7.0).all())
    if columns:
        got = big[dst][:, hidden:hidden + (1 if dtype == torch.float32 else 2)]
        assert torch.equal(got.contiguous().view(torch.float32)[:, 0], probs)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("topk,shared", [(1, False), (2, True), (6, True), (6, False)])
def test_sum_expert_rows(device, dtype, topk, shared):
    gen = torch.Generator().manual_seed(topk)
    num_tokens, hidden = 33, 300
    rows = torch.randn(num_tokens * topk, hidden, generator=gen, dtype=torch.float64)
    token_of_row = torch.randperm(num_tokens * topk, generator=gen) % num_tokens
    shared_out = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    rows_d = rows.to(device=device, dtype=dtype)
    shared_d = shared_out.to(device=device, dtype=dtype) if shared else None
    got = sum_expert_rows(rows_d, token_of_row.to(device), num_tokens, shared_d)
    # float64 reference from the rounded inputs
    want = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    want.index_add_(0, token_of_row, rows_d.double().cpu())
    if shared:
        want = want.to(dtype).double() + shared_d.double().cpu()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert got.dtype == dtype
    assert torch.allclose(got.double().cpu(), want, rtol=tol, atol=tol)
    assert sum_expert_rows(rows_d[:0], token_of_row[:0].to(device), 0).shape == (0, hidden)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("shared", [False, True])
def test_sum_rows_skips_empty_slots(device, dtype, out_dtype, shared):
    # Owners with 0 to 3 rows (slots 3), as the deduplicated scheme's sums have; owner 5 none.
    gen = torch.Generator().manual_seed(3)
    num_owners, hidden = 9, 700
    owner = torch.tensor([0, 3, 3, 1, 8, 0, 3, 2, 7, 7, 4, 6, 0, 1], dtype=torch.long)
    rows = torch.randn(owner.numel(), hidden, generator=gen, dtype=torch.float64)
    rows_d = rows.to(device=device, dtype=dtype)
    extra = torch.randn(num_owners, hidden, generator=gen, dtype=torch.float64)
    extra_d = extra.to(device=device, dtype=out_dtype) if shared else None
    table = slot_table(owner.to(device), num_owners, 3)
    assert table.shape == (num_owners, 3)
    assert table[5].tolist() == [owner.numel()] * 3  # an owner with no rows: empty slots only
    assert table[3].tolist() == [1, 2, 6]  # rows in row order
    got = sum_rows(rows_d, table, out_dtype, extra_d)
    want = torch.zeros(num_owners, hidden, dtype=torch.float64)
    want.index_add_(0, owner, rows_d.double().cpu())
    if shared:
        want = want.to(out_dtype).double() + extra_d.double().cpu()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[
        out_dtype if dtype != torch.bfloat16 or out_dtype != torch.float32 else torch.float32]
    assert got.dtype == out_dtype and got.shape == (num_owners, hidden)
    assert torch.allclose(got.double().cpu(), want, rtol=tol, atol=tol)
    assert bool((got[5].double().cpu() == (extra_d[5].double().cpu() if shared else 0.0)).all())
    # no rows at all: every slot empty
    empty = sum_rows(rows_d[:0], slot_table(owner[:0].to(device), num_owners, 2), out_dtype)
    assert empty.shape == (num_owners, hidden) and not bool(empty.any())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("probs_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_experts,topk,ep_size,chunks,hot", [
    (1000, 16, 4, 2, 3, None), (37, 8, 2, 1, 1, 5), (3000, 160, 6, 2, 4, 7), (0, 8, 2, 2, 2, None),
    (5, 16, 4, 4, 2, None)])
def test_route_rows_kernel_matches_torch(probs_dtype, num_tokens, num_experts, topk, ep_size,
                                         chunks, hot):
    """The one-pass numbering of the routed rows (chunk-major expert order, empty experts, one hot
    expert, no tokens) gives the torch path's rows and weights exactly."""
    from megatron_eps.pipeline.rows.per_pair import permute_chunk_major
    from megatron_eps.pipeline.layout import ChunkLayout

    gen = torch.Generator().manual_seed(num_tokens + num_experts)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if hot is not None:
        scores[:, hot] += 10.0
    routing = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    routing.scatter_(1, scores.topk(topk, dim=1).indices, True)
    probs = (torch.rand(num_tokens, num_experts, generator=gen) * routing).to(probs_dtype)
    counts = routing.sum(dim=0).numpy()
    matrix = np.stack([counts] * ep_size)
    layout = ChunkLayout.build(matrix, 0, num_experts // ep_size, chunks)
    tokens = torch.randn(num_tokens, 8, generator=gen).cuda()
    routing, probs = routing.cuda(), probs.cuda()
    num_rows = int(counts.sum())
    want = permute_chunk_major(tokens, probs, routing, layout.expert_order, num_rows)
    got = permute_chunk_major(tokens, probs, routing, layout.expert_order, num_rows,
                              rows_per_expert=counts, top_k=topk)
    for field in ("tokens", "probs", "sorted_indices"):
        assert torch.equal(getattr(got, field), getattr(want, field))
    # each token's rows in row order, as the final sum reads them (what sorting would give)
    assert want.token_rows is None
    sorted_out = torch.argsort(want.sorted_indices, stable=True).view(num_tokens, topk)
    assert torch.equal(got.token_rows, sorted_out)


def check_split_counts(device, num_tokens, num_experts, topk, tokens_per_split, through_jit=False):
    """The count pass's [splits, E] int32 against torch's sums over each split of tokens, with a
    hot expert (every token's first pick) and an expert no token picks."""
    from megatron_eps.row_kernels import count_routed_per_split

    gen = torch.Generator().manual_seed(num_tokens + num_experts)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    scores[:, num_experts // 2] += 10.0
    scores[:, 1] = -1.0
    routing = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    routing.scatter_(1, scores.topk(topk, dim=1).indices, True)
    splits = -(-num_tokens // tokens_per_split)
    padded = torch.zeros(splits * tokens_per_split, num_experts, dtype=torch.int32)
    padded[:num_tokens] = routing.to(torch.int32)
    want = padded.view(splits, tokens_per_split, num_experts).sum(dim=1, dtype=torch.int32)
    assert int(want[:, 1].sum()) == 0 and int(want[:, num_experts // 2].sum()) == num_tokens
    got = count_routed_per_split(routing.to(device).view(torch.uint8), tokens_per_split, 256,
                                 through_jit=through_jit)
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens,num_experts,topk,tokens_per_split", [
    (16384, 160, 6, 512), (5000, 160, 6, 512), (5000, 160, 6, 256), (3000, 128, 8, 1024),
    (1000, 64, 6, 512), (700, 8, 2, 512), (300, 12, 3, 256)])
def test_count_routed_per_split_matches_torch(num_tokens, num_experts, topk, tokens_per_split):
    check_split_counts("cuda", num_tokens, num_experts, topk, tokens_per_split)
