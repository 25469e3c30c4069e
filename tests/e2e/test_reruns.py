"""The README's test command run a second time on the same machine (the quickstart's second
run is tests/e2e/test_quickstart.py, which runs its install step too).

On 2026-12-03 any second run failed in the install step: with Hugging Face's `kernels`
installed, setuptools loaded its plug-in while building the project, and the repository's
`kernels/` folder shadowed it. tools/ensure_venv.sh now reinstalls from the lock, and pip
finds every package at its locked version.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="reinstalls the repository's .venv; this interpreter is another environment")
def test_tests_command_runs_a_second_time():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "R1V_SKIP_INSTALL")}
    proc = subprocess.run(["bash", "tests/run.sh", "--co", "-q", "-p", "no:cacheprovider", "tests/unit/test_package.py"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "[ensure_venv] installing megatron-r1v[test,data] into .venv from the lock constraints-cpu-py311.txt" \
        in proc.stdout
    assert "No broken requirements found." in proc.stdout  # pip check after the install
    assert "tests/unit/test_package.py::test_hugging_face_kernels_wins_from_the_repository_root" in proc.stdout
