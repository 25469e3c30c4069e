#!/usr/bin/env bash
# Sourced by tests/run.sh, examples/quickstart.sh and examples/ssb_ablation.sh: creates
# .venv (Python 3.11) when missing and installs this project with its test and data extras
# from the lock, constraints-cpu-py311.txt: every package, direct and transitive, at the
# version the test suite last passed with (torch is the CPU build on the development
# machines' disk). `bash tools/lock_deps.sh update` regenerates the lock.
#
# Idempotent: run again, every package already has its locked version, so pip installs
# nothing and only re-registers the editable project (about 15 s). Sets PY to the venv's python.
PYTHON_BIN="${PYTHON:-python3.11}"
R1V_LOCK=constraints-cpu-py311.txt
if [ ! -x .venv/bin/python ]; then
  echo "[ensure_venv] creating .venv with ${PYTHON_BIN}"
  "${PYTHON_BIN}" -m venv .venv
fi
PY=.venv/bin/python
venv_python=$("${PY}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "${venv_python}" != 3.11 ]; then
  echo "[ensure_venv] error: .venv runs Python ${venv_python}, the lock ${R1V_LOCK} is for Python 3.11;" \
       "remove .venv (or set PYTHON to a python3.11) and run again" >&2
  return 1 2>/dev/null || exit 1
fi
if [ "${R1V_SKIP_INSTALL:-0}" = 1 ]; then
  echo "[ensure_venv] R1V_SKIP_INSTALL=1: using .venv as it is"
  return 0 2>/dev/null || exit 0
fi
echo "[ensure_venv] installing megatron-r1v[test,data] into .venv from the lock ${R1V_LOCK}"
# setuptools first and from the lock: the project is built with it in place rather than in
# an isolated build environment, which would take whatever setuptools is newest that day.
# The lock pins torch to the CPU build, so no multi-GB CUDA build is ever pulled in.
"${PY}" -m pip install -q --disable-pip-version-check -c "${R1V_LOCK}" setuptools
"${PY}" -m pip install -q --disable-pip-version-check -c "${R1V_LOCK}" --no-build-isolation -e ".[test,data]"
"${PY}" -m pip check --disable-pip-version-check
