"""Run the Triton kernels under TRITON_INTERPRET=1 on the CPU (fp32) and print errors as JSON.

Started in a subprocess by test_triton_interpreter.py: the interpreter must be switched on
before triton is imported, and must not leak into other tests of the session.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_eps.experts import get_backend  # noqa: E402
from megatron_eps.experts import triton_kernels as tk  # noqa: E402
from megatron_eps.experts.activation import ActivationSpec, _known_activations  # noqa: E402
from megatron_eps.experts.gemm_common import DeviceRowEnds  # noqa: E402
from megatron_eps.experts.reference import reference_expert_forward, relative_error  # noqa: E402
from megatron_eps.experts.weights import ExpertWeights, StackedExperts  # noqa: E402


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {}
    configs = {
        "default": None,
        "small_tiles_not_persistent": lambda c, h, f, g: (
            tk.GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, persistent=False),
            tk.GemmConfig(block_m=32, block_n=32, block_k=32, group_m=3, num_warps=4, persistent=False),
        ),
        "persistent_mixed_tiles": lambda c, h, f, g: (
            tk.GemmConfig(block_m=16, block_n=32, block_k=32, group_m=4, num_warps=4),
            tk.GemmConfig(block_m=32, block_n=16, block_k=16, group_m=1, num_warps=4),
        ),
        "tma_descriptors": lambda c, h, f, g: (
            tk.GemmConfig(block_m=16, block_n=16, block_k=32, group_m=2, num_warps=4, tma=True),
            tk.GemmConfig(block_m=32, block_n=32, block_k=16, group_m=3, num_warps=4, tma=True),
        ),
    }
    # H=40 is not a multiple of the K tile: exercises the masked K loop.
    # 20 experts: the tile decode's prefix sum spans more than one 16-expert block.
    shapes = {"even": (4, 64, 48), "ragged_k": (3, 40, 24), "many_experts": (20, 32, 16)}
    for shape_name, (n, hidden, ffn) in shapes.items():
        fc1 = torch.randn(n, 2 * ffn, hidden) / hidden**0.5
        fc2 = torch.randn(n, hidden, ffn) / ffn**0.5
        for spec_name, spec in {
            "swiglu": ActivationSpec.swiglu(),
            "swiglu_clamp_offset": ActivationSpec(
                gated=True, fn=F.silu, clamp=0.7, glu_offset=1.0, fused_code=1
            ),
            "probs_on_input": ActivationSpec.swiglu(probs_on_input=True),
        }.items():
            experts = StackedExperts(ExpertWeights.from_tensors(fc1, fc2, spec))
            cases = {
                "mixed_with_empty": ([5, 0, 70, 3] * 5)[:n],
                "one_hot_expert": ([0, 77, 0, 0] * 5)[:n],
                "all_empty": [0] * n,
            }
            if n > 16:
                cases["last_experts_only"] = [0] * (n - 2) + [33, 17]
            for config_name, chooser in configs.items():
                tk.set_config_chooser(chooser)
                for case, counts in cases.items():
                    rows = sum(counts)
                    x = torch.randn(rows, hidden)
                    probs = torch.rand(rows)
                    out = get_backend("triton").forward(experts, x, counts, probs, 0)
                    key = f"{shape_name}/{spec_name}/{config_name}/{case}"
                    if rows == 0:
                        results[key] = 0.0 if out.shape == (0, hidden) else float("inf")
                        continue
                    ref = reference_expert_forward(fc1, fc2, spec, x, counts, probs)
                    results[key] = relative_error(out, ref)
                    if spec_name == "swiglu":
                        # The rows per expert only on the device: the grid is sized for the
                        # most m-tiles any split takes, the kernel counts the real ones.
                        ends = DeviceRowEnds(torch.tensor(np.cumsum(counts), dtype=torch.int32), rows)
                        out = get_backend("triton").forward(experts, x, ends, probs, 0)
                        results[key + "/device_row_ends"] = relative_error(out, ref)
            tk.set_config_chooser(None)
        # A sub-range of experts.
        experts = StackedExperts(ExpertWeights.from_tensors(fc1, fc2))
        counts = [9, 0]
        x, probs = torch.randn(9, hidden), torch.rand(9)
        out = get_backend("triton").forward(experts, x, counts, probs, 1)
        ref = reference_expert_forward(fc1, fc2, experts.weights().activation, x, counts, probs, 1)
        results[f"{shape_name}/subrange"] = relative_error(out, ref)

    # Non-gated experts (relu) and an activation the kernel does not know (torch fallback).
    fc1 = torch.randn(2, 24, 32) / 6
    for name, spec in {
        "relu_plain": ActivationSpec(gated=False, fn=F.relu, fused_code=3),
        "unknown_fn": ActivationSpec(gated=True, fn=torch.tanh, fused_code=None),
    }.items():
        fc2 = torch.randn(2, 32, 12 if spec.gated else 24) / 4
        experts = StackedExperts(ExpertWeights.from_tensors(fc1, fc2, spec))
        counts = [6, 11]
        x, probs = torch.randn(17, 32), torch.rand(17)
        out = get_backend("triton").forward(experts, x, counts, probs, 0)
        results[f"activation/{name}"] = relative_error(
            out, reference_expert_forward(fc1, fc2, spec, x, counts, probs)
        )

    # The standalone fused activation kernel, every activation it knows.
    for fn, code in _known_activations().items():
        for gated in (True, False):
            for clamp, offset in ((None, 0.0), (0.5, 1.0)):
                if not gated and clamp is not None:
                    continue
                spec = ActivationSpec(gated=gated, fn=fn, clamp=clamp, glu_offset=offset, fused_code=code)
                h = torch.randn(37, 2 * 40 if gated else 40)
                probs = torch.rand(37)
                out = tk.fused_activation(h, probs, spec)
                ref = spec.apply_torch(h.double(), probs.double())
                key = f"fused_activation/{getattr(fn, '__name__', fn)}/gated={gated}/clamp={clamp}"
                results[key] = relative_error(out, ref)
    # The permutation's row-sum kernel (row_kernels.sum_rows): owners with 0 to 3 rows.
    from megatron_eps import row_kernels as pk

    _, summer = pk._kernels()
    owner = torch.tensor([0, 3, 3, 1, 8, 0, 3, 2, 7, 7, 4, 6, 0, 1])
    rows, shared = torch.randn(owner.numel(), 300), torch.randn(9, 300)
    table = torch.full((9, 3), owner.numel(), dtype=torch.long)  # each owner's rows in order
    for row, o in enumerate(owner.tolist()):
        table[o, int((table[o] < owner.numel()).sum())] = row
    for with_shared in (False, True):
        out = torch.empty(9, 300)
        summer.kernel[(9,)](rows, table, shared if with_shared else out, out, 300, rows.stride(0),
                            rows.shape[0], SLOTS=3, BLOCK=pk.row_block(300), WITH_SHARED=with_shared)
        ref = torch.zeros(9, 300, dtype=torch.float64).index_add_(0, owner, rows.double())
        if with_shared:
            ref += shared.double()
        results[f"permute/sum_rows/shared={with_shared}"] = relative_error(out, ref)
    # The deduplicated scheme's placement kernel (unique_rows.place_unique_rows): the torch
    # path's bytes, rows placed in order and scattered, a hot expert, empty chunks.
    from megatron_eps.pipeline.rows import unique_rows
    from megatron_eps.pipeline.rows import dedup as dedup_scheme

    gen = torch.Generator().manual_seed(5)
    for ep_size, (start, end), hot in ((1, (0, 12), None), (2, (1, 5), 2), (3, (0, 1), None)):
        tokens = torch.randn(23, 40, generator=gen)
        scores = torch.rand(23, 12, generator=gen)
        if hot is not None:
            scores[:, hot] += 10.0
        routing = torch.zeros(23, 12, dtype=torch.bool).scatter_(1, scores.topk(3, dim=1).indices, True)
        probs = torch.rand(23, 12, generator=gen) * routing
        local = 12 // ep_size
        num_rows = int(routing.view(23, ep_size, local)[:, :, start:end].any(dim=2).sum())
        slots = min(3, end - start)
        width = 40 + dedup_scheme.meta_columns(40, torch.float32, torch.float32, slots)
        want = torch.full((num_rows, width), -7.0)  # the padding past the fields stays
        sent = unique_rows._send_rows(routing, ep_size, (start, end))
        unique_rows._place_unique_rows_torch(tokens, probs, routing, ep_size, (start, end), want,
                                            slots, sent)
        for scattered in (False, True):
            dst = torch.randperm(num_rows + 4, generator=gen)[:num_rows] if scattered else None
            out = torch.full((num_rows + 4 if scattered else num_rows, width), -7.0)
            unique_rows._place_unique_rows_triton(tokens, probs, routing, ep_size, (start, end),
                                                 out, slots, dst, num_rows, sent, through_jit=True)
            placed = out[dst] if scattered else out
            same = torch.equal(placed.view(torch.int32), want.view(torch.int32))
            results[f"dedup/place/ep={ep_size}/chunk={start}-{end}/scattered={scattered}"] = (
                0.0 if same else float("inf"))
    # Its histogram of each token's next expert (unique_rows.range_unique_counts): the torch path.
    for ep_size, experts, tokens_n in ((1, 12, 23), (3, 12, 23), (2, 10, 1)):
        scores = torch.rand(tokens_n, experts, generator=gen)
        routing = torch.zeros(tokens_n, experts, dtype=torch.bool).scatter_(
            1, scores.topk(3, dim=1).indices, True)
        got = unique_rows._next_expert_histogram_triton(routing, ep_size, 3, through_jit=True)
        want = unique_rows._next_expert_histogram_torch(routing, ep_size)
        results[f"dedup/next_expert_histogram/ep={ep_size}/experts={experts}"] = (
            0.0 if torch.equal(got, want) else float("inf"))
    # The per-pair scheme's numbering of the routed rows (row_kernels.route_rows) against
    # the torch path, experts laid out chunk-major (tokens more than one block: 1500 > 1024).
    from megatron_eps.pipeline.rows.per_pair import permute_chunk_major
    from megatron_eps.pipeline.layout import ChunkLayout

    # (identity order is given either way: as positions, or as None the way the dispatcher
    # passes it)
    for num_tokens, ep_size, chunks, pass_position in ((1500, 2, 3, True), (7, 1, 1, True),
                                                       (300, 1, 1, False)):
        scores = torch.rand(num_tokens, 12, generator=gen)
        routing = torch.zeros(num_tokens, 12, dtype=torch.bool).scatter_(
            1, scores.topk(3, dim=1).indices, True)
        probs = torch.rand(num_tokens, 12, generator=gen) * routing
        counts = routing.sum(dim=0).numpy()
        layout = ChunkLayout.build(np.stack([counts] * ep_size), 0, 12 // ep_size, chunks)
        want = permute_chunk_major(torch.zeros(num_tokens, 4), probs, routing,
                                   layout.expert_order, int(counts.sum()))
        sizes = counts[layout.expert_order]
        first = np.empty(12, dtype=np.int64)
        first[layout.expert_order] = np.cumsum(sizes) - sizes
        position = np.empty(12, dtype=np.int64)
        position[layout.expert_order] = np.arange(12)
        rows, weights, table = pk.route_rows(
            routing, probs, torch.from_numpy(first), int(counts.sum()), through_jit=True,
            top_k=3, position=torch.from_numpy(position) if pass_position else None)
        want_table = torch.argsort(want.sorted_indices, stable=True).view(num_tokens, 3)
        same = (torch.equal(rows, want.sorted_indices) and torch.equal(weights, want.probs)
                and torch.equal(table, want_table))
        results[f"permute/route_rows/tokens={num_tokens}/ep={ep_size}/chunks={chunks}"
                f"/position={'given' if pass_position else 'none'}"] = (
            0.0 if same else float("inf"))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
