#!/usr/bin/env bash
# Creates .venv (Python 3.11) when missing, installs torch 2.13.0 (CPU build on the
# development machines) and this project with its test and data extras, then runs
# pytest. Extra arguments go to pytest; the exit status is pytest's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON_BIN="${PYTHON:-python3.11}"
if [ ! -x .venv/bin/python ]; then
  echo "[tests/run.sh] creating .venv with ${PYTHON_BIN}"
  "${PYTHON_BIN}" -m venv .venv
fi
PY=.venv/bin/python
echo "[tests/run.sh] installing torch==2.13.0 and megatron-r1v[test,data]"
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
"${PY}" -m pip install -q --disable-pip-version-check torch==2.13.0
"${PY}" -m pip install -q --disable-pip-version-check -e ".[test,data]"

echo "[tests/run.sh] running pytest $*"
set +e
"${PY}" -m pytest "$@"
status=$?
set -e
exit "${status}"
