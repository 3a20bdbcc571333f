#!/usr/bin/env bash
# Runs the whole test suite (installs what it needs first). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
set -euo pipefail
python -c "import torch, megatron.core; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| cuda', torch.cuda.is_available())"
exec python -m pytest -q tests "$@"
