"""Shared by tests/e2e/test_sft_rounds.py and tests/e2e/test_mpo_rounds.py: runs an
examples/*_rounds.sh script with a clean environment and reads what its runs leave behind."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_script(script: Path, knobs_read: tuple[str, ...], **knobs: str) -> subprocess.CompletedProcess:
    """``bash script`` with exactly these knobs (and the repository's .venv as it is): none of
    ``knobs_read`` (every knob the script reads) leaks in from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if k not in knobs_read + ("PYTHONSAFEPATH", "R1V_SKIP_INSTALL")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **knobs)
    if (REPO / ".venv" / "bin" / "python").exists():  # the install step is tested by test_quickstart.py
        env["R1V_SKIP_INSTALL"] = "1"
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=600)


def make_random_model(out: Path) -> None:
    """A random tiny R1V (tools/make_tiny_checkpoint.py, seed 0) in ``out``."""
    made = subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_checkpoint.py"), "--out", str(out),
                           "--seed", "0"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert made.returncode == 0, made.stderr[-3000:]


_MADE: dict[str, Path] = {}


def random_model(tmp_path_factory) -> Path:
    """``make_random_model`` once per test session (the scripts only read MODEL): the folder."""
    if "random" not in _MADE:
        out = tmp_path_factory.mktemp("random_tiny_r1v") / "random"
        make_random_model(out)
        _MADE["random"] = out
    return _MADE["random"]


def files(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: relative path -> (sha256, mtime in ns)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def scalars(tb_dir: Path, tag: str) -> list[float]:
    """The TensorBoard scalars ``tag`` in ``tb_dir``, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return [s.value for s in sorted(events.Scalars(tag), key=lambda s: s.step)]


def weights(hf_dir: Path) -> dict:
    """Every tensor of the HF checkpoint in ``hf_dir``."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors
