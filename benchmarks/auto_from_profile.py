"""pipeline_degree auto from a profile that megatron-eps-calibrate wrote: what the cost model
reads from it and the chunks it picks for a DeepSeek-V2-Lite layer at EP = 1, 2, 4, 8.

    python benchmarks/auto_from_profile.py PROFILE.json [--tokens 4096,16384]
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile")
    ap.add_argument("--tokens", default="4096,16384", help="tokens per rank")
    args = ap.parse_args(argv)
    from megatron_eps.config import EPSConfig
    from megatron_eps.policy.cost_model import LayerShape
    from megatron_eps.policy.degree import choose_chunking
    from megatron_eps.policy.profile import load_pipeline_profile

    eps_config = EPSConfig(pipeline_degree="auto", cost_profile=args.profile)
    for transport in (None, "nccl", "copy_engine"):
        profile = load_pipeline_profile(eps_config.cost_profile, None, transport)
        print(f"profile [{transport or 'pipeline'}]: {profile}")
    profile = load_pipeline_profile(eps_config.cost_profile, None)
    for ep in (1, 2, 4, 8):
        shape = LayerShape(2048, 1408, 64 // ep, ep, 6, shared_ffn_hidden_size=2816)
        for tokens in (int(t) for t in args.tokens.split(",")):
            counts = np.full((ep, 64), tokens * 6 // 64, dtype=np.int64)
            sizes = choose_chunking(counts, shape, eps_config, profile)
            print(f"EP={ep} tokens/rank={tokens}: N={len(sizes)} experts per chunk {list(sizes)}")


if __name__ == "__main__":
    main()
