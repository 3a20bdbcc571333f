"""Write a random-weight MoE GPT checkpoint with Megatron-LM's own code: its parse_args,
initialize_megatron, model builder (model_provider + gpt_builders.gpt_builder) and
save_checkpoint (torch_dist format). No weights can be downloaded here; this makes some.

Run with a Megatron-LM checkout first on PYTHONPATH, Megatron's usual model flags and --save:

    PYTHONPATH=$MEGATRON_LM_ROOT:$PWD python scripts/write_moe_checkpoint.py \\
        --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 4096 \\
        --max-position-embeddings 4096 --num-experts 8 --moe-router-topk 2 \\
        --moe-token-dispatcher-type alltoall --tokenizer-type NullTokenizer --vocab-size 1024 \\
        --micro-batch-size 1 --save /tmp/moe_ckpt [--expert-model-parallel-size 2 under torchrun]

Through ``python -m megatron_eps.launch scripts/write_moe_checkpoint.py --eps-moe ...`` the model
saved is the EPS one (same parameters and keys). On a machine without CUDA it runs on CPU ranks
(gloo: pass --distributed-backend gloo) with megatron_eps.testing's CPU shims.
"""

import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eps.testing.megatron_lm_run import megatron_lm_run_setup  # noqa: E402


def main():
    allow_no_cuda = megatron_lm_run_setup()
    from megatron_eps import compat
    from gpt_builders import gpt_builder
    from model_provider import model_provider

    from megatron.training import get_args, get_model
    from megatron.training.checkpointing import save_checkpoint

    compat.initialize_megatron_lm(allow_no_cuda=allow_no_cuda,
                        args_defaults={"micro_batch_size": 1, "no_load_rng": True,
                                       "no_load_optim": True, "save_interval": 1})
    args = get_args()
    if not args.save:
        raise SystemExit("write_moe_checkpoint: --save DIR is required")
    model = get_model(partial(model_provider, gpt_builder), wrap_with_ddp=False)
    save_checkpoint(1, model, None, None, 0)
    import torch

    if torch.distributed.get_rank() == 0:
        print(f"write_moe_checkpoint: saved {type(model[0]).__name__} to {args.save} "
              f"({args.ckpt_format})", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
