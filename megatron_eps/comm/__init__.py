"""How a chunk's rows travel between the ranks of the expert-parallel group.

The pipeline (``dispatcher.pipelined_forward``) talks to one ``ExpertTransport`` per forward:
per chunk its row scheme writes the rows where ``send_rows`` says, then ``dispatch`` /
``received`` / ``hand_back`` / ``combine``, and finally it reads ``combined_rows``
(``base``). Transports only move rows; what the rows are is the pipeline's. One file per
transport:

* ``nccl.NCCLTransport``: ``all_to_all_single`` on the EP process group (NCCL on GPUs, gloo on
  CPU), rows regrouped by expert on the receiver. Works anywhere.
* ``copy_engine.CopyEngineTransport``: the GPUs' copy engines write every row straight into its
  final place in the peer's symmetric-memory buffer; completion travels as stream memory
  operations, so no SM is used for communication.

``selection.TransportChoice`` maps ``EPSConfig.transport`` (auto | nccl | copy_engine) to one.
"""

from megatron_eps.comm.all_to_all import AllToAll, ProcessGroupAllToAll
from megatron_eps.comm.base import Completion, ExpertTransport

__all__ = ["AllToAll", "ProcessGroupAllToAll", "Completion", "ExpertTransport"]
