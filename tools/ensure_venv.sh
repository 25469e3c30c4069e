#!/usr/bin/env bash
# Sourced by tests/run.sh, examples/quickstart.sh and examples/ssb_ablation.sh: creates
# .venv (Python 3.11) when missing and installs this project with its test and data extras
# from the lock, constraints-cpu-py311.txt: every package, direct and transitive, at one
# exact version (torch is the CPU build on the development machines' disk; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), then the locked sglang wheel
# without its dependencies (its source, for tests/unit/test_sglang_source.py). `bash
# tools/lock_deps.sh update` regenerates the lock.
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
# sglang, the rollout extra's engine, as its source only: --no-deps leaves out its GPU stack
# (CUDA torch, sgl-kernel, flashinfer, ...), so it cannot be imported here; the test
# tests/unit/test_sglang_source.py reads it (with ast) to check rollout/sglang_engine.py against
# the version the lock pins. Idempotent: a second run finds it installed at that version.
if ! "${PY}" -m pip install -q --disable-pip-version-check --no-deps -c constraints-cpu-py311.txt sglang; then
  echo "[ensure_venv] error: installing sglang (--no-deps) from constraints-cpu-py311.txt failed (above)" >&2
  return 1 2>/dev/null || exit 1
fi
# pip check, less what it says about sglang: its requirements are left out on purpose (above),
# and nothing else requires it. Any other finding fails the install as before.
pip_check=$("${PY}" -m pip check --disable-pip-version-check 2>&1) || true
pip_broken=$(printf '%s\n' "${pip_check}" | grep -v -E '^(sglang |No broken requirements found)' || true)
if [ -n "${pip_broken}" ]; then
  printf '%s\n' "${pip_broken}"
  echo "[ensure_venv] error: pip check found broken requirements (above)" >&2
  unset pip_check pip_broken
  return 1 2>/dev/null || exit 1
fi
echo "[ensure_venv] pip check: No broken requirements found. (sglang's own requirements are not checked: it is" \
     "installed --no-deps, as source for tests/unit/test_sglang_source.py)"
unset pip_check pip_broken
