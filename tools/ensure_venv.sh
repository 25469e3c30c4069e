#!/usr/bin/env bash
# Sourced by tests/run.sh and examples/quickstart.sh: creates .venv (Python 3.11) when
# missing and installs torch 2.13.0 (CPU build on the development machines) and this
# project with its test and data extras. Sets PY to the venv's python.
PYTHON_BIN="${PYTHON:-python3.11}"
if [ ! -x .venv/bin/python ]; then
  echo "[ensure_venv] creating .venv with ${PYTHON_BIN}"
  "${PYTHON_BIN}" -m venv .venv
fi
PY=.venv/bin/python
if [ "${R1V_SKIP_INSTALL:-0}" = 1 ]; then
  # Set by tests that run the example scripts from inside the already-installed .venv.
  echo "[ensure_venv] R1V_SKIP_INSTALL=1: using .venv as it is"
  return 0 2>/dev/null || exit 0
fi
echo "[ensure_venv] installing torch==2.13.0 and megatron-r1v[test,data]"
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
"${PY}" -m pip install -q --disable-pip-version-check torch==2.13.0
"${PY}" -m pip install -q --disable-pip-version-check -e ".[test,data]"
