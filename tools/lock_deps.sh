#!/usr/bin/env bash
# The lock of the CPU test environment, constraints-cpu-py311.txt, and the check against
# the newest releases the project allows (setup.py's ranges).
#
#   bash tools/lock_deps.sh newest   # fresh venv with the newest allowed releases; runs the
#                                    # smoke subset; prints what moved against the lock; the
#                                    # lock is not touched. Exit 1 when the smoke subset fails.
#   bash tools/lock_deps.sh update   # the same, then writes the lock from that venv (only when
#                                    # the smoke subset passed); then run `bash tests/run.sh`
#                                    # (it installs from the new lock) and commit the lock.
#
# Run `newest` regularly (weekly, and before a release): a new release that breaks us then
# fails here first instead of in a user's fresh install. torch stays at the lock's CPU build
# in both modes (the development machines carry that build on disk; a newer torch is a
# deliberate change: edit the lock's torch line, then run `update`). Needs python3.11 (or
# PYTHON=...) and the package index; takes a few minutes (pip's cache holds the large
# wheels after one run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOCK=constraints-cpu-py311.txt
# One or two fast test files per dependency: megatron-core (decoder parity at TP=2),
# transformers (InternVL / Qwen2 parity, generation), triton (kernels in the interpreter), pyarrow
# (benchmark parquet files),
# DALI + Pillow (tiling, the DALI operator build), zarr (SSB store), math-verify (rule reward), matplotlib and
# tensorboard (plots), the import-name contracts (test_package: HF `kernels` vs ours).
SMOKE_TESTS=(
  tests/unit/test_package.py tests/unit/test_config.py tests/unit/test_kernels.py tests/unit/test_rewards.py
  tests/unit/test_eval_formats.py tests/unit/test_eval_scoring.py tests/unit/test_sglang_source.py
  tests/unit/test_ssb.py tests/unit/test_data_tiling.py tests/unit/test_dali_plugin.py tests/unit/test_hf_engine.py
  tests/unit/test_r1v_model.py tests/unit/test_plotting.py
  tests/distributed/test_decoder_parity.py
)

mode="${1:-}"
if [ "${mode}" != newest ] && [ "${mode}" != update ]; then
  echo "usage: bash tools/lock_deps.sh newest|update" >&2
  exit 2
fi
torch_pin=$(grep -E '^torch==' "${LOCK}" || true)
if [ -z "${torch_pin}" ]; then
  echo "error: ${LOCK} has no torch==... line" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "${work}"' EXIT
echo "${torch_pin}" > "${work}/torch.txt"

python_bin="${PYTHON:-python3.11}"
echo "[lock_deps] fresh venv in ${work} (${python_bin}); newest allowed releases, ${torch_pin}"
"${python_bin}" -m venv "${work}/venv"
PY="${work}/venv/bin/python"
pip_install() { "${PY}" -m pip install -q --disable-pip-version-check -c "${work}/torch.txt" "$@"; }
pip_install --upgrade setuptools
pip_install --no-build-isolation -e ".[test,data]"
"${PY}" -m pip check --disable-pip-version-check
# sglang as tools/ensure_venv.sh installs it: the newest release, --no-deps (its source only, for
# tests/unit/test_sglang_source.py), after pip check, which would list its absent GPU stack.
pip_install --no-deps sglang
"${PY}" -m pip freeze --all --exclude-editable --disable-pip-version-check | grep -v -E '^pip==' | sort -f \
  > "${work}/resolved.txt"

echo "[lock_deps] changes against ${LOCK} (- locked, + newest):"
grep -v -E '^(#|$)' "${LOCK}" | sort -f > "${work}/locked.txt"
# diff exits 1 when the files differ; under pipefail that must not read as "no changes".
changes=$(diff "${work}/locked.txt" "${work}/resolved.txt" || true)
if [ -n "${changes}" ]; then
  echo "${changes}" | grep -E '^[<>]' | sed -e 's/^</  -/' -e 's/^>/  +/'
else
  echo "  none"
fi

echo "[lock_deps] smoke subset: ${SMOKE_TESTS[*]}"
smoke_status=0
"${PY}" -m megatron_r1v.train --help > /dev/null || smoke_status=1
"${PY}" -c "import transformers.models.internvl.modeling_internvl, megatron_r1v.kernels" || smoke_status=1
"${PY}" -m pytest -q -p no:cacheprovider "${SMOKE_TESTS[@]}" || smoke_status=1
if [ "${smoke_status}" != 0 ]; then
  echo "[lock_deps] the smoke subset FAILED with the newest allowed releases (changes above)" >&2
  exit 1
fi
echo "[lock_deps] the smoke subset passed with the newest allowed releases"

if [ "${mode}" = update ]; then
  {
    echo "# The CPU test environment of megatron-r1v: every package the test suite installs, direct"
    echo "# and transitive, at one exact version (Python 3.11, Linux x86_64; torch is the CPU build"
    echo "# the development machines carry on disk). tools/ensure_venv.sh installs with these as pip"
    echo "# constraints. Regenerate: bash tools/lock_deps.sh update (it writes the lock only after its"
    echo "# smoke subset passed; commit it only after the whole suite passed with it)."
    echo "# Resolved $(date -u +%Y-%m-%d) by tools/lock_deps.sh update. sglang is installed with --no-deps"
    echo "# (its source only, read by tests/unit/test_sglang_source.py)."
    cat "${work}/resolved.txt"
  } > "${LOCK}.tmp"
  mv "${LOCK}.tmp" "${LOCK}"
  echo "[lock_deps] wrote ${LOCK} ($(grep -c -v '^#' "${LOCK}") packages); next: bash tests/run.sh, then commit it"
fi
