#!/usr/bin/env bash
# Creates .venv when missing, installs the project with its test and data extras
# (tools/ensure_venv.sh), then runs pytest. Extra arguments go to pytest; the exit
# status is pytest's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/ensure_venv.sh

echo "[tests/run.sh] running pytest $*"
set +e
"${PY}" -m pytest "$@"
status=$?
set -e
exit "${status}"
