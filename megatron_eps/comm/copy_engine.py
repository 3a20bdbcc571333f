"""CopyEngineTransport: rows written by the GPUs' copy engines into the peers' symmetric memory.

Why: NCCL's all-to-all kernels need SMs, and a persistent grouped GEMM holds all of them, so
the two serialize (calibrate_transport.py on two H200s: NCCL's overlap beside a grouped GEMM
is 0; benchmarks/results/transport/links_h200_x2.json). A ``cudaMemcpyAsync`` into a peer's
buffer runs on a copy engine and takes no SM, so it proceeds beside the GEMM.

How (``copy_engine_plan`` has the row arithmetic):

* dispatch(g): one batched copy-engine call writes this rank's rows of chunk g straight into
  their final rows of every peer's receive area (expert-major, the GEMM's order: nothing is
  regrouped on the receiver), then a stream memory operation bumps a flag in each peer's
  memory to the forward's sequence number. Rows for this rank's own experts were placed in its
  receive area by the permutation and never move.
* received(g): the receiver's compute stream waits (a stream memory operation, no SM) until
  every peer's flag for chunk g reached the sequence number; the rows are a view of the
  receive area.
* combine(g): the outputs of this rank's experts are copied to their source ranks' return
  buffers; after the last chunk a flag per peer tells it its rows are back. The outputs for
  this rank's own rows are moved by one row-copy kernel on the compute stream (``hand_back``):
  as copy-engine copies, one per expert, they were many small copies that queued on the comm
  stream ahead of the next chunk's transfer to the peers (a trace on two H200s:
  docs/transports.md).
* With the layout's local rows apart, a chunk's receive rows start with a local part of the
  rank's own rows (``received(g, LOCAL_PART)``, placed by the permutation, so they wait for no
  peer), then the rest (``PEER_PART``); ``combine(g)`` sends the second part's outputs.

Buffers are sized from the all-gathered count matrix (the same numbers on every rank), grown
geometrically and reused across forwards and layers. The count all-gather that starts every
forward is the fence that keeps a peer from writing a buffer this rank still reads: a rank
enters it only after its previous forward's reads were issued, in stream order.

``SymmetricPeerMemory`` is the real memory (torch symmetric memory + cuda-bindings);
``SimulatedPeers`` runs the same transport for several ranks in one process on plain tensors,
for tests of the arithmetic.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_eps import staging
from megatron_eps.comm.base import LOCAL_PART, PEER_PART, Completion, ExpertTransport, SendRows
from megatron_eps.comm.copy_engine_plan import CopyEngineLayout, RowCopies
from megatron_eps.row_kernels import copy_rows

logger = logging.getLogger(__name__)

# Flag slots per (receiving rank, sending rank): one per dispatch chunk and one for the combine.
MAX_CHUNKS = 256
COMBINE_SLOT = MAX_CHUNKS
NUM_SLOTS = MAX_CHUNKS + 1
# Symmetric buffers grow to at least this factor of their old size, in steps of this many bytes.
GROWTH = 1.5
GRANULE = 2 << 20

DISPATCH_BUFFER = "dispatch"
RETURN_BUFFER = "return"


class PeerMemory:
    """Buffers of the same size on every rank of an EP group, and copies and flags between them."""

    ep_size: int
    ep_rank: int

    def ensure(self, dispatch_bytes: int, return_bytes: int) -> None:
        """Grow both buffers to at least these sizes (all ranks call it with the same sizes)."""
        raise NotImplementedError

    def local(self, which: str) -> torch.Tensor:
        """This rank's buffer ``which`` as uint8 [capacity bytes]."""
        raise NotImplementedError

    def copy_rows(self, src: torch.Tensor, batches: Sequence[Tuple[int, str, RowCopies]]) -> None:
        """Issue on the current stream: for each (rank, buffer, copies), rows of ``src`` (2-D,
        contiguous) to rows of that rank's buffer viewed as rows of ``src``'s width and dtype."""
        raise NotImplementedError

    def signal(self, peer: int, slot: int, value: int) -> None:
        """After the current stream's earlier work: set flag (slot, this rank) on ``peer``."""
        raise NotImplementedError

    def wait(self, peer: int, slot: int, value: int, stream) -> None:
        """``stream`` waits until this rank's flag (slot, peer) is >= value."""
        raise NotImplementedError

    def next_sequence(self) -> int:
        self._sequence = getattr(self, "_sequence", 0) + 1
        return self._sequence


class _FlagWait(Completion):
    """Waits for flags set by peers (and, optionally, for an event of this rank)."""

    def __init__(self, memory: PeerMemory, slot: int, value: int, peers: Sequence[int], event=None):
        self.memory, self.slot, self.value, self.peers, self.event = memory, slot, value, peers, event

    def wait(self, stream) -> None:
        if self.event is not None:
            stream.wait_event(self.event)
        for peer in self.peers:
            self.memory.wait(peer, self.slot, self.value, stream)


def _rows_view(buffer: torch.Tensor, byte_offset: int, rows: int, width: int, dtype) -> torch.Tensor:
    row_bytes = width * torch.empty((), dtype=dtype).element_size()
    return buffer[byte_offset : byte_offset + rows * row_bytes].view(dtype).view(rows, width)


class CopyEngineTransport(ExpertTransport):
    name = "copy_engine"
    moves_rows = True
    waits_without_timeout = True

    # The deduplicated scheme is tested with simulated peers (CPU, and one GPU with a stream
    # pair per rank) and across processes with ranks sharing one GPU (EP 2 and 4); it has not
    # run on a multi-GPU machine yet (dispatch_dedup is off by default).
    supports_dedup = True
    splits_local_rows = True

    def __init__(self, memory: PeerMemory):
        self.memory = memory

    def begin(self, layout, counts, width, hidden, dtype, device):
        if layout.num_chunks > MAX_CHUNKS:
            raise ValueError(
                f"copy_engine transport supports at most {MAX_CHUNKS} chunks, got {layout.num_chunks}"
            )
        self._dedup = getattr(layout, "unique_rows", None) is not None
        if self._dedup:
            plan = CopyEngineLayout.for_unique_rows(layout.unique_rows, layout.ep_rank)
        else:
            plan = CopyEngineLayout.build(
                counts, layout.ep_rank, layout.expert_ranges,
                local_head=layout.local_head_rows if layout.local_rows_apart else None)
        out_dtype = getattr(layout, "combine_dtype", None) or dtype
        element = torch.empty((), dtype=dtype).element_size()
        row_bytes = width * element
        out_row_bytes = hidden * torch.empty((), dtype=out_dtype).element_size()
        self.memory.ensure(
            (plan.recv_capacity + plan.staging_capacity) * row_bytes,
            plan.return_capacity * out_row_bytes,
        )
        self.plan, self.layout = plan, layout
        self._device = torch.device(device)
        self.sequence = self.memory.next_sequence()
        dispatch_buffer = self.memory.local(DISPATCH_BUFFER)
        self._dispatch_rows = _rows_view(
            dispatch_buffer, 0, plan.recv_capacity + plan.staging_capacity, width, dtype
        )
        self._recv = self._dispatch_rows[: plan.recv_capacity]
        self._staging = self._dispatch_rows[plan.recv_capacity :]
        self._return = _rows_view(
            self.memory.local(RETURN_BUFFER), 0, layout.send_offsets[-1], hidden, out_dtype
        )
        self._outputs: List[Optional[torch.Tensor]] = [None] * layout.num_chunks
        self._placed: List[Optional[object]] = [None] * layout.num_chunks
        self._peers = [r for r in range(plan.ep_size) if r != plan.ep_rank]

    def send_rows(self, chunk, weights=None):
        if weights is not None:
            raise ValueError(
                "copy_engine transport needs the routing weight packed into each row (hidden "
                "size * element size a multiple of the weight's size); use transport: nccl"
            )
        if chunk == 0:
            # Each send row's dispatch-buffer row, built on the device from the few runs.
            self._buffer_rows, = rows_of_runs(
                self.plan.run_sizes, self._device, self.plan.run_buffer_row
            )
        first, end = self.layout.send_offsets[chunk], self.layout.send_offsets[chunk + 1]
        return SendRows(self._dispatch_rows, self._buffer_rows[first:end])

    def rows_placed(self, chunk):
        if self._device.type == "cuda":
            # The chunk's own rows land in the receive area here, on this stream: the experts
            # wait for this as well as for the peers' flags.
            self._placed[chunk] = torch.cuda.current_stream().record_event()

    def dispatch(self, chunk):
        copies = self.plan.dispatch[chunk]
        self.memory.copy_rows(
            self._staging, [(peer, DISPATCH_BUFFER, copies[peer]) for peer in self._peers]
        )
        for peer in self._peers:
            self.memory.signal(peer, chunk, self.sequence)
        return _FlagWait(self.memory, chunk, self.sequence, self._peers, self._placed[chunk])

    def received(self, chunk, part=None):
        start, end = self.plan.recv_chunk_offsets[chunk : chunk + 2]
        split = start + self.plan.recv_local_rows[chunk]
        if part == LOCAL_PART:
            end = split
        elif part == PEER_PART:
            start = split
        return self._recv[start:end], None

    def hand_back(self, chunk, outputs, part=None):
        """Outputs of the rank's own rows go to its return buffer now; the peers' wait for
        ``combine(chunk)``."""
        outputs = outputs.contiguous()
        if part == LOCAL_PART:
            own = self.plan.combine_local[chunk]
        else:
            own = self.plan.combine[chunk][self.plan.ep_rank]
            self._outputs[chunk] = outputs
        if len(own):
            src, dst = rows_of_runs(own.num_rows, outputs.device, own.src_rows, own.dst_rows)
            copy_rows(outputs, src, self._return, dst)

    def combine(self, chunk):
        outputs = self._outputs[chunk]
        if outputs.is_cuda:
            # Made on the compute stream, read by the copies issued here: keep the allocator
            # from reusing it before they ran.
            outputs.record_stream(torch.cuda.current_stream())
        copies = self.plan.combine[chunk]
        self.memory.copy_rows(
            outputs, [(peer, RETURN_BUFFER, copies[peer]) for peer in self._peers]
        )
        self._outputs[chunk] = None
        if chunk != self.layout.num_chunks - 1:
            return None
        for peer in self._peers:
            self.memory.signal(peer, COMBINE_SLOT, self.sequence)
        event = torch.cuda.current_stream().record_event() if outputs.is_cuda else None
        return _FlagWait(self.memory, COMBINE_SLOT, self.sequence, self._peers, event)

    def combined_rows(self):
        return self._return

    def end(self):
        self._recv = self._staging = self._return = self._dispatch_rows = self._buffer_rows = None
        self._outputs = []
        self._placed = []


def rows_of_runs(sizes: np.ndarray, device: torch.device, *starts: np.ndarray):
    """For runs of ``sizes[i]`` consecutive rows, one [sum(sizes)] int64 device tensor per
    array in ``starts``: the rows of every run, run after run, the run i from ``starts[i]``.

    Built on the device from the few runs (one small non-blocking copy, no host sync).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    first_of_run = np.cumsum(sizes) - sizes
    runs = staging.to_device(np.stack([sizes] + [np.asarray(s) - first_of_run for s in starts]),
                             device)
    total = int(sizes.sum())
    position = torch.arange(total, device=device)
    return tuple(position + torch.repeat_interleave(runs[i + 1], runs[0], output_size=total)
                 for i in range(len(starts)))


# ------------------------------------------------------------------------ simulated (tests)
class SimulatedPeers:
    """The memory of ``ep_size`` ranks in one process, for tests.

    ``memory(rank)`` is that rank's PeerMemory. Copies are tensor assignments on the current
    stream; a wait on a flag that is not set raises, so a missing or misordered signal fails the
    test instead of hanging. On a GPU a flag is also an event recorded where it was set, which
    the waiting stream waits for: ranks with streams of their own on one GPU are ordered as the
    flags order them.
    """

    def __init__(self, ep_size: int, device="cpu"):
        self.ep_size = ep_size
        self.device = torch.device(device)
        self.buffers: List[Dict[str, torch.Tensor]] = [
            {DISPATCH_BUFFER: torch.zeros(0, dtype=torch.uint8, device=self.device),
             RETURN_BUFFER: torch.zeros(0, dtype=torch.uint8, device=self.device)}
            for _ in range(ep_size)
        ]
        self.flags = np.zeros((ep_size, NUM_SLOTS, ep_size), dtype=np.int64)
        self.flag_events = {}  # (owner, slot, sender) -> the event recorded when it was set
        self.copies_issued = 0
        self._memories = [_SimulatedMemory(self, r) for r in range(ep_size)]

    def memory(self, rank: int) -> "PeerMemory":
        return self._memories[rank]


class _SimulatedMemory(PeerMemory):
    def __init__(self, world: SimulatedPeers, rank: int):
        self.world, self.ep_rank, self.ep_size = world, rank, world.ep_size

    def ensure(self, dispatch_bytes, return_bytes):
        mine = self.world.buffers[self.ep_rank]
        for which, need in ((DISPATCH_BUFFER, dispatch_bytes), (RETURN_BUFFER, return_bytes)):
            if mine[which].numel() < need:
                # Poison fresh memory so a row that is read but never written shows up.
                mine[which] = torch.full((need,), 0xFF, dtype=torch.uint8, device=self.world.device)

    def local(self, which):
        return self.world.buffers[self.ep_rank][which]

    def copy_rows(self, src, batches):
        width, dtype = src.shape[1], src.dtype
        for rank, which, copies in batches:
            buffer = self.world.buffers[rank][which]
            rows = buffer.numel() // (width * src.element_size())
            dst = _rows_view(buffer, 0, rows, width, dtype)
            for s, d, n in zip(copies.src_rows, copies.dst_rows, copies.num_rows):
                dst[d : d + n] = src[s : s + n]
                self.world.copies_issued += 1

    def signal(self, peer, slot, value):
        self.world.flags[peer, slot, self.ep_rank] = value
        if self.world.device.type == "cuda":
            self.world.flag_events[peer, slot, self.ep_rank] = (
                torch.cuda.current_stream().record_event())

    def wait(self, peer, slot, value, stream):
        have = self.world.flags[self.ep_rank, slot, peer]
        if have < value:
            raise RuntimeError(
                f"rank {self.ep_rank} waits for flag (slot {slot}, peer {peer}) >= {value}, "
                f"which holds {have}"
            )
        if stream is not None and self.world.device.type == "cuda":
            stream.wait_event(self.world.flag_events[self.ep_rank, slot, peer])


# ------------------------------------------------------------------------ real memory
class SymmetricPeerMemory(PeerMemory):
    """Torch symmetric memory on the EP group; copies through cuda-bindings' batched memcpy.

    Flags are int32 words in a symmetric buffer of their own, written with
    ``cuStreamWriteValue32`` (its default flags put a memory fence before the write, so the
    copies the stream ran before it are visible first) and awaited with
    ``cuStreamWaitValue32(GEQ)``: both run in the stream's front end and use no SM, so a
    flag is neither delayed behind a persistent GEMM nor delays one.
    """

    def __init__(self, group, device: torch.device):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        from megatron_eps.comm import cuda_ops

        self._dist, self._symm_mem, self._ops = dist, symm_mem, cuda_ops
        self.group = group
        self.device = device
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self._flags, self._flag_ptrs = self._allocate(NUM_SLOTS * self.ep_size * 4)
        self._flags.zero_()
        self._buffers: Dict[str, torch.Tensor] = {}
        self._pointers: Dict[str, List[int]] = {}
        self._capacity = {DISPATCH_BUFFER: 0, RETURN_BUFFER: 0}
        # Every rank's flags are zero before any peer may set one.
        torch.cuda.synchronize(device)
        dist.barrier(group=group, device_ids=[device.index])

    def _allocate(self, nbytes: int) -> Tuple[torch.Tensor, List[int]]:
        """A buffer of ``nbytes`` on every rank (collective): this rank's as uint8, and every
        rank's device address of it, as this process sees it."""
        tensor = self._symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        handle = self._symm_mem.rendezvous(tensor, self.group)
        offset = tensor.data_ptr() - int(handle.buffer_ptrs[self.ep_rank])
        return tensor, [int(p) + offset for p in handle.buffer_ptrs]

    def _release(self, which: str) -> None:
        """Drop buffer ``which`` (collective; every rank's work on it has finished)."""
        self._buffers.pop(which, None)

    def ensure(self, dispatch_bytes, return_bytes):
        wanted = {DISPATCH_BUFFER: dispatch_bytes, RETURN_BUFFER: return_bytes}
        # A first forward with no rows at all still gets (small) buffers to view.
        grow = {k: max(v, 1) for k, v in wanted.items()
                if v > self._capacity[k] or k not in self._buffers}
        if not grow:
            return
        # Peers may still copy into the old buffers from the last forward's stream work.
        torch.cuda.synchronize(self.device)
        self._dist.barrier(group=self.group, device_ids=[self.device.index])
        for which, need in grow.items():
            size = max(need, int(self._capacity[which] * GROWTH))
            size = -(-size // GRANULE) * GRANULE
            self._release(which)
            self._buffers[which], self._pointers[which] = self._allocate(size)
            self._capacity[which] = size
            logger.info("copy_engine transport: %s buffer %.1f MiB per rank", which, size / 2**20)

    def local(self, which):
        return self._buffers[which]

    def capacity_bytes(self) -> int:
        return sum(self._capacity.values())

    def copy_rows(self, src, batches):
        row_bytes = src.shape[1] * src.element_size()
        if src.stride(0) * src.element_size() != row_bytes or not src.is_contiguous():
            raise ValueError("copy_rows needs contiguous rows")
        base = src.data_ptr()
        dsts, srcs, sizes = [], [], []
        for rank, which, copies in batches:
            if not len(copies):
                continue
            dst_base = self._pointers[which][rank]
            dsts.append(dst_base + copies.dst_rows * row_bytes)
            srcs.append(base + copies.src_rows * row_bytes)
            sizes.append(copies.num_rows * row_bytes)
        if not dsts:
            return
        self._ops.memcpy_batch(
            np.concatenate(dsts), np.concatenate(srcs), np.concatenate(sizes),
            torch.cuda.current_stream(self.device).cuda_stream,
        )

    def _flag(self, owner: int, slot: int, sender: int) -> int:
        return self._flag_ptrs[owner] + (slot * self.ep_size + sender) * 4

    def signal(self, peer, slot, value):
        self._ops.stream_write_u32(
            torch.cuda.current_stream(self.device).cuda_stream,
            self._flag(peer, slot, self.ep_rank),
            value,
        )

    def wait(self, peer, slot, value, stream):
        self._ops.stream_wait_geq_u32(stream.cuda_stream, self._flag(self.ep_rank, slot, peer), value)
