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


def _split(folder: Path, rows: list[tuple[str, str, str]]) -> None:
    """A synthetic split: prompts.jsonl and metadata.jsonl of (id, task, answer) rows."""
    folder.mkdir(parents=True)
    (folder / "prompts.jsonl").write_text("".join(json.dumps(
        {"id": i, "images": [], "question": "q", "answer": a, "answer_type": "text"}) + "\n" for i, _, a in rows))
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"id": i, "task": t}) + "\n" for i, t, _ in rows))


def test_quickstart_summary(tmp_path):
    _events(tmp_path / "tb" / "sft", {"sft/loss": [4.0, 2.0]})
    _events(tmp_path / "tb" / "mpo", {"mpo/loss": [3.0, 2.0, 1.0], "mpo/reward_margin": [0.0, 1.0, 2.0]})
    _events(tmp_path / "tb" / "grpo", {"train/accuracy": [0.1, 0.2, 0.3, 0.5],
                                       "ssb/effective_ratio_batch": [1.0, 1.0, 0.5, 1.0],
                                       "ssb/effective_ratio_fresh": [0.5, 0.5, 0.5, 0.25]})
    # Training answers: color mostly "red" (3 of 4), count mostly "2" (2 of 3, "1" seen first once).
    _split(tmp_path / "data" / "train", [("t0", "color", "red"), ("t1", "color", "blue"), ("t2", "color", "red"),
                                         ("t3", "color", "red"), ("t4", "count", "1"), ("t5", "count", "2"),
                                         ("t6", "count", "2")])
    heldout = [("h0", "color", "red"), ("h1", "color", "blue"), ("h2", "color", "green"), ("h3", "color", "red"),
               ("h4", "count", "2"), ("h5", "count", "3"), ("h6", "count", "1"), ("h7", "count", "4")]
    _split(tmp_path / "data" / "heldout", heldout)
    (tmp_path / "logs").mkdir()
    right = {"start": set(), "after_sft": {"h0", "h4"}, "after_mpo": {"h0", "h1", "h4", "h5"},
             "after_grpo": {"h0", "h1", "h2", "h4", "h5", "h6", "h7"}}
    for stage, correct in right.items():
        acc = len(correct) / 8
        (tmp_path / f"eval_{stage}").mkdir()
        (tmp_path / f"eval_{stage}" / "result.json").write_text(json.dumps({"pass@1": acc, "format": 1.0,
                                                                            "num_items": 8}))
        # evaluate.runner's lines: one response per item (greedy).
        (tmp_path / f"eval_{stage}" / "samples.jsonl").write_text("".join(
            json.dumps({"id": i, "responses": [{"correct": i in correct}]}) + "\n" for i, _, _ in heldout))
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "suite.json").write_text(json.dumps({"benchmarks": [
        {"name": "MMMU-format", "k": 2, "pass@1": 0.75, "pass@k": 0.875, "num_items": 8, "mean_tokens": 40.5,
         "truncation_rate": 0.0}]}))
    for name, (a, b) in {"parts": (10, 40), "sft": (50, 90), "mpo": (100, 160), "grpo": (170, 200),
                         "bench": (200, 215)}.items():
        (tmp_path / "logs" / f"{name}_start.t").write_text(f"{a}\n")
        (tmp_path / "logs" / f"{name}_end.t").write_text(f"{b}\n")
    proc = _report("quickstart", "--run-dir", str(tmp_path), "--started", "0")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accuracy"] == {"start": 0.0, "after_sft": 0.25, "after_mpo": 0.5, "after_grpo": 0.875}
    # Constant guesses "red" and "2": h0, h3 and h4 of 8.
    assert summary["ceiling"] == 3 / 8
    assert summary["ceiling_by_task"] == {"color": {"answer": "red", "accuracy": 0.5},
                                          "count": {"answer": "2", "accuracy": 0.25}}
    assert summary["accuracy_by_task"]["after_grpo"] == {"color": 0.75, "count": 1.0}
    assert summary["accuracy_by_task"]["after_sft"] == {"color": 0.25, "count": 0.25}
    assert summary["stage_seconds"] == {"parts": 30.0, "sft": 40.0, "mpo": 60.0, "grpo": 30.0, "bench": 15.0}
    assert summary["benchmarks"][0]["pass@k"] == 0.875
    assert summary["steps"] == {"sft": 2, "mpo": 3, "grpo": 4}
    assert summary["grpo_second_half"]["train/accuracy"] == pytest.approx(0.4)  # steps 2 and 3
    assert summary["goals"] == {"after_sft_beats_start": True, "after_mpo_beats_after_sft": True,
                                "after_grpo_beats_after_mpo": True, "after_grpo_points_over_ceiling": 50.0,
                                "after_grpo_at_least_ceiling_plus_25_points": True,
                                "after_grpo_beats_constant_guess_on_every_task": True}
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "87.5%" in proc.stdout and "37.5%" in proc.stdout and "ceiling" in proc.stdout
    assert "MMMU-format" in proc.stdout and "pass@2  87.5%" in proc.stdout
    # After SFT, color (25%) is below its constant guess (50%): a run stopped there fails that goal.
    (tmp_path / "eval_after_grpo" / "samples.jsonl").write_text(
        (tmp_path / "eval_after_sft" / "samples.jsonl").read_text())
    proc = _report("quickstart", "--run-dir", str(tmp_path))
    assert not json.loads((tmp_path / "summary.json").read_text())["goals"][
        "after_grpo_beats_constant_guess_on_every_task"]
    (tmp_path / "eval_after_grpo" / "result.json").unlink()
    missing = _report("quickstart", "--run-dir", str(tmp_path))
    assert missing.returncode == 1 and "eval_after_grpo/result.json is missing" in missing.stderr


def test_ablation_compares_second_halves(tmp_path):
    common = {"train/accuracy": [0.1, 0.1, 0.2, 0.2], "train/reward_mean": [0.1, 0.1, 0.2, 0.2]}
    _events(tmp_path / "with", {**common, "ssb/effective_ratio_batch": [0.5, 1.0, 1.0, 1.0],
                                "ssb/effective_ratio_fresh": [0.5, 0.5, 0.75, 0.25]})
    _events(tmp_path / "without", {**common, "ssb/effective_ratio_batch": [0.5, 0.5, 0.75, 0.25],
                                   "ssb/effective_ratio_fresh": [0.5, 0.5, 0.75, 0.25]})
    (tmp_path / "with" / "eval").mkdir()
    (tmp_path / "with" / "eval" / "result.json").write_text(json.dumps({"pass@1": 0.3}))
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
