"""tools/run_report.py: summary.json, the ablation JSON and their PNGs from hand-made runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

REPO = Path(__file__).resolve().parents[2]


def _events(directory: Path, series: dict[str, list[float]]) -> None:
    writer = SummaryWriter(str(directory))
    for tag, values in series.items():
        for step, value in enumerate(values):
            writer.add_scalar(tag, value, step)
    writer.close()


def _report(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "run_report.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_quickstart_summary(tmp_path):
    _events(tmp_path / "tb" / "mpo", {"mpo/loss": [3.0, 2.0, 1.0], "mpo/reward_margin": [0.0, 1.0, 2.0]})
    _events(tmp_path / "tb" / "grpo", {"train/accuracy": [0.1, 0.2, 0.3, 0.5],
                                       "ssb/effective_ratio_batch": [1.0, 1.0, 0.5, 1.0],
                                       "ssb/effective_ratio_fresh": [0.5, 0.5, 0.5, 0.25]})
    for stage, acc in (("start", 0.0), ("after_mpo", 0.125), ("after_grpo", 0.2)):
        (tmp_path / f"eval_{stage}.json").write_text(json.dumps({"accuracy": acc, "format": acc, "num_prompts": 8}))
    (tmp_path / "logs").mkdir()
    for name, (a, b) in {"mpo": (100, 160), "grpo": (170, 200)}.items():
        (tmp_path / "logs" / f"{name}_start.t").write_text(f"{a}\n")
        (tmp_path / "logs" / f"{name}_end.t").write_text(f"{b}\n")
    proc = _report("quickstart", "--run-dir", str(tmp_path), "--started", "0")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accuracy"] == {"start": 0.0, "after_mpo": 0.125, "after_grpo": 0.2}
    assert summary["stage_seconds"] == {"mpo": 60.0, "grpo": 30.0} and summary["steps"] == {"mpo": 3, "grpo": 4}
    assert summary["grpo_second_half"]["train/accuracy"] == pytest.approx(0.4)  # steps 2 and 3
    assert summary["goals"] == {"after_mpo_beats_start": True, "after_grpo_gain_points": 20.0,
                                "after_grpo_gain_at_least_15_points": True}
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "20.0%" in proc.stdout and "12.5%" in proc.stdout
    (tmp_path / "eval_after_grpo.json").unlink()
    missing = _report("quickstart", "--run-dir", str(tmp_path))
    assert missing.returncode == 1 and "eval_after_grpo.json is missing" in missing.stderr


def test_ablation_compares_second_halves(tmp_path):
    common = {"train/accuracy": [0.1, 0.1, 0.2, 0.2], "train/reward_mean": [0.1, 0.1, 0.2, 0.2]}
    _events(tmp_path / "with", {**common, "ssb/effective_ratio_batch": [0.5, 1.0, 1.0, 1.0],
                                "ssb/effective_ratio_fresh": [0.5, 0.5, 0.75, 0.25]})
    _events(tmp_path / "without", {**common, "ssb/effective_ratio_batch": [0.5, 0.5, 0.75, 0.25],
                                   "ssb/effective_ratio_fresh": [0.5, 0.5, 0.75, 0.25]})
    (tmp_path / "with" / "eval.json").write_text(json.dumps({"accuracy": 0.3}))
    proc = _report("ablation", "--run", f"with={tmp_path / 'with'}", "--run", f"without={tmp_path / 'without'}",
                   "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert result["with"]["effective_ratio_batch_second_half"] == 1.0
    assert result["without"]["effective_ratio_batch_second_half"] == 0.5
    assert result["with"]["heldout_accuracy"] == 0.3 and "heldout_accuracy" not in result["without"]
    assert result["with"]["final"]["train/accuracy"] == pytest.approx(0.2)
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 10_000
    bad = _report("ablation", "--run", str(tmp_path / "with"), "--out", str(tmp_path / "o2"))
    assert bad.returncode == 1 and "expected LABEL=DIR" in bad.stderr
