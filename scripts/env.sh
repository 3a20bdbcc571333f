#!/usr/bin/env bash
# Source me: creates .venv (once) with everything megatron-eps needs, then activates it.
# CPU machines (the dev box, CI) get the CPU build of torch 2.13.0; a machine that already has
# torch with CUDA (set EPS_USE_SYSTEM_TORCH=1) keeps its own.
set -e
EPS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EPS_VENV:-$EPS_ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  if [ "${EPS_USE_SYSTEM_TORCH:-0}" = "1" ]; then
    python3 -m venv --system-site-packages "$VENV"
  else
    python3 -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ ! -f "$VENV/.eps-installed" ] || [ "$EPS_ROOT/setup.py" -nt "$VENV/.eps-installed" ]; then
  echo "megatron-eps: installing into $VENV (torch, megatron-core, PyYAML, pytest, Triton;" \
       "about a minute on first use)..." >&2
  python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  if [ "${EPS_USE_SYSTEM_TORCH:-0}" != "1" ]; then
    # Pin the CPU build first so that no dependency pulls a multi-GB CUDA build.
    python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  fi
  python -m pip install -q -e "$EPS_ROOT[test]" 2>&1 | grep -v "is ignored" || true
  python -W ignore -c "import torch, megatron.core, yaml, megatron_eps"
  touch "$VENV/.eps-installed"
  echo "megatron-eps: install done" >&2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
set +e
