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
# pip's output goes to a log and is printed only when pip fails (its ERROR lines always), so a
# good install prints two lines, not setuptools' notices about editable installs.
EPS_INSTALL_LOG="$VENV/.eps-install.log"
_eps_pip_install() {
  local output status
  output="$(python -m pip install "$@" 2>&1)" && status=0 || status=$?
  printf '%s\n' "$output" >>"$EPS_INSTALL_LOG"
  if [ "$status" -ne 0 ]; then
    echo "megatron-eps: 'pip install $*' failed (exit $status); the end of its output" \
         "(all of it: $EPS_INSTALL_LOG):" >&2
    printf '%s\n' "$output" | tail -n 40 >&2
    return "$status"
  fi
  printf '%s\n' "$output" | grep "^ERROR:" >&2 || true
}
if [ ! -f "$VENV/.eps-installed" ] || [ "$EPS_ROOT/setup.py" -nt "$VENV/.eps-installed" ]; then
  echo "megatron-eps: installing into $VENV (torch, megatron-core, PyYAML, pytest, Triton;" \
       "a few minutes on first use)..." >&2
  : >"$EPS_INSTALL_LOG"
  _eps_pip_install --upgrade pip
  if [ "${EPS_USE_SYSTEM_TORCH:-0}" != "1" ]; then
    # Pin the CPU build first so that no dependency pulls a multi-GB CUDA build.
    _eps_pip_install "torch==2.13.0"
  fi
  _eps_pip_install -e "$EPS_ROOT[test]"
  python -W ignore -c "import torch, megatron.core, yaml, megatron_eps"
  touch "$VENV/.eps-installed"
  echo "megatron-eps: install done" >&2
fi
unset -f _eps_pip_install
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
set +e
