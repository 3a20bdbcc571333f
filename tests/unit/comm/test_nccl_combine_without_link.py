"""NCCLTransport on a group of one rank (EP=1, nothing crosses a link): with one chunk the
experts' output is handed over as the combined rows without a copy; with several chunks, or an
output of another dtype than the combine's, the rows are copied into one buffer in chunk order."""

import numpy as np
import pytest
import torch

from megatron_eps.comm.all_to_all import ProcessGroupAllToAll
from megatron_eps.comm.nccl import NCCLTransport
from megatron_eps.pipeline.layout import ChunkLayout

HIDDEN = 8


def _run(chunks, output_dtype=torch.float32, combine_dtype=torch.float32):
    counts = np.array([[3, 0, 5, 2]])  # [ep=1, 4 experts]
    layout = ChunkLayout.build(counts, 0, 4, chunks)
    transport = NCCLTransport(ProcessGroupAllToAll(None))
    assert not transport.moves_rows
    transport.begin(layout, counts, HIDDEN, HIDDEN, combine_dtype, torch.device("cpu"))
    outputs = []
    for chunk in range(layout.num_chunks):
        rows = layout.send_offsets[chunk + 1] - layout.send_offsets[chunk]
        out = torch.randn(rows, HIDDEN).to(output_dtype)
        transport.hand_back(chunk, out)
        transport.combine(chunk)
        outputs.append(out)
    combined = transport.combined_rows()
    transport.end()
    return outputs, combined


def test_one_chunk_hands_the_output_over():
    (output,), combined = _run(1)
    assert combined is output


@pytest.mark.parametrize("chunks", [2, 4])
def test_several_chunks_are_copied_in_order(chunks):
    outputs, combined = _run(chunks)
    assert all(combined.data_ptr() != o.data_ptr() for o in outputs if o.numel())
    assert torch.equal(combined, torch.cat(outputs))


def test_an_output_of_another_dtype_is_copied_into_the_combine_dtype():
    (output,), combined = _run(1, output_dtype=torch.bfloat16, combine_dtype=torch.float32)
    assert combined.dtype == torch.float32 and combined.data_ptr() != output.data_ptr()
    assert torch.equal(combined, output.float())
