#!/usr/bin/env bash
# Sourced by tests/run.sh, examples/quickstart.sh and examples/ssb_ablation.sh: creates
# .venv (Python 3.11) when missing and installs this project with its test and data extras
# from the lock, constraints-cpu-py311.txt: every package, direct and transitive, at one
# exact version (torch is the CPU build on the development machines' disk; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu). `bash tools/lock_deps.sh
# update` regenerates the lock.
#
# Idempotent: run again, every package already has its locked version, so pip installs
# nothing and only re-registers the editable project (about 15 s). Sets PY to the venv's
# python; leaves no other variable behind in the shell that sources it.
if [ ! -x .venv/bin/python ]; then
  echo "[ensure_venv] creating .venv with ${PYTHON:-python3.11}"
  "${PYTHON:-python3.11}" -m venv .venv
fi
PY=.venv/bin/python
if [ "$("${PY}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != 3.11 ]; then
  echo "[ensure_venv] error: .venv does not run Python 3.11, which the lock constraints-cpu-py311.txt is for;" \
       "remove .venv (or set PYTHON to a python3.11) and run again" >&2
  return 1 2>/dev/null || exit 1
fi
if ! "${PY}" -m pip --version > /dev/null 2>&1; then
  echo "[ensure_venv] .venv has no pip (an interrupted creation?): bootstrapping it with ensurepip"
  "${PY}" -m ensurepip --upgrade > /dev/null
fi
if [ "${R1V_SKIP_INSTALL:-0}" = 1 ]; then
  echo "[ensure_venv] R1V_SKIP_INSTALL=1: using .venv as it is"
  return 0 2>/dev/null || exit 0
fi
echo "[ensure_venv] installing megatron-r1v[test,data] into .venv from the lock constraints-cpu-py311.txt"
# setuptools first and from the lock: the project is built with it in place rather than in
# an isolated build environment, which would take whatever setuptools is newest that day.
# The lock pins torch to the CPU build, so no multi-GB CUDA build is ever pulled in.
if ! { "${PY}" -m pip install -q --disable-pip-version-check -c constraints-cpu-py311.txt setuptools \
       && "${PY}" -m pip install -q --disable-pip-version-check -c constraints-cpu-py311.txt \
            --no-build-isolation -e ".[test,data]"; }; then
  echo "[ensure_venv] error: installing from constraints-cpu-py311.txt failed (above). Where pip finds no" \
       "torch==2.13.0+cpu, the machine lacks the local CPU build: set" \
       "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu and run again" >&2
  return 1 2>/dev/null || exit 1
fi
"${PY}" -m pip check --disable-pip-version-check
