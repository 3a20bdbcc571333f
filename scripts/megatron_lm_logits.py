"""Load a Megatron checkpoint into the model Megatron-LM's own builder makes and run one
forward: Megatron-LM's parse_args, initialize_megatron, model_provider + gpt_builders and
load_checkpoint. Writes, from rank 0, a JSON report (the MoE layers' classes and EPS settings)
and the logits of fixed token ids (``--logits-out``), so two runs (stock and EPS, any EP size)
can be compared.

    PYTHONPATH=$MEGATRON_LM_ROOT:$PWD python [-m megatron_eps.launch] scripts/megatron_lm_logits.py \\
        <the model flags of the checkpoint> --load DIR --logits-out out.pt [--eps-moe ...]
"""

import json
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eps.testing.megatron_lm_run import megatron_lm_run_setup  # noqa: E402


def add_logits_args(parser):
    group = parser.add_argument_group("megatron_lm_logits")
    group.add_argument("--logits-out", required=True, help="file of the logits (torch.save)")
    group.add_argument("--logits-tokens", type=int, default=48, help="tokens per sequence")
    group.add_argument("--logits-batch", type=int, default=2, help="sequences")
    return parser


def main():
    allow_no_cuda = megatron_lm_run_setup()
    from megatron_eps import compat
    from gpt_builders import gpt_builder
    from model_provider import model_provider

    import torch
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.training import get_args, get_model
    from megatron.training.checkpointing import load_checkpoint

    compat.initialize_megatron_lm(extra_args_provider=add_logits_args, allow_no_cuda=allow_no_cuda,
                        args_defaults={"micro_batch_size": 1, "no_load_rng": True,
                                       "no_load_optim": True, "exit_on_missing_checkpoint": True})
    args = get_args()
    model = get_model(partial(model_provider, gpt_builder), wrap_with_ddp=False)
    load_checkpoint(model, None, None, strict=True)
    model = model[0]
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, args.padded_vocab_size, (args.logits_batch, args.logits_tokens),
                           generator=generator).to(device)
    positions = torch.arange(args.logits_tokens, device=device).expand_as(tokens)
    with torch.inference_mode():
        logits = model(tokens, positions, None)
    if torch.distributed.get_rank() == 0:
        torch.save(logits.float().cpu(), args.logits_out)
        report = {
            "moe_layer_classes": sorted({type(m).__name__ for m in layers}),
            "moe_layers": len(layers),
            "eps_settings": [m.eps_config.to_dict() for m in layers if hasattr(m, "eps_config")],
            "expert_model_parallel_size": args.expert_model_parallel_size,
            # the expert backend of each chunk of the last pipelined forward (empty: stock)
            "pipelined_backends": [list(getattr(m, "last_expert_backends", None) or [])
                                   for m in layers],
            "spec": args.spec,
        }
        with open(args.logits_out + ".json", "w") as f:
            json.dump(report, f)
        print("megatron_lm_logits: " + json.dumps(report)[:300], flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
