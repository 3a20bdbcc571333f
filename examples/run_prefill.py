"""Prefill throughput, stock Megatron-Core MoE vs EPS-MoE (thin wrapper of megatron_eps.inference.prefill).

    torchrun --nproc-per-node 2 examples/run_prefill.py --config configs/tiny.yaml
    python examples/run_prefill.py --help
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eps.inference.prefill import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
