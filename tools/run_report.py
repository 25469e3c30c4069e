"""Summaries of the example runs: ``summary.json``, a PNG of their curves and a table.

    python tools/run_report.py quickstart --run-dir runs/quickstart [--started EPOCH_S]
    python tools/run_report.py ablation --run with_ssb=DIR --run without_ssb=DIR --out DIR

``quickstart`` reads what examples/quickstart.sh left in the run folder (the evaluation folders
eval_<stage>/ of ``python -m megatron_r1v.evaluate``: result.json and the per-item samples.jsonl;
benchmarks/suite.json, the data splits, TensorBoard events under tb/sft, tb/mpo and tb/grpo,
stage timestamps under logs/) and writes ``summary.json`` (accuracies as fractions, overall and
per task, after every stage; ``ceiling``: the held-out accuracy of answering each task's most
common training answer; the goals; ``benchmarks``: the suite table's rows) and ``curves.png``.
``ablation`` compares GRPO runs (examples/ssb_ablation.sh): the effective-sample ratio of the
batches and the accuracy per step in one PNG, and each run's final numbers in
``ablation.json``. Both print a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

from megatron_r1v.data.synthetic import read_jsonl
from megatron_r1v.plotting import load_scalars, plot_runs

STAGES = ("start", "after_sft", "after_mpo", "after_grpo")
STAGE_LABELS = ("start", "after SFT", "after MPO", "after GRPO")
TRAINING_STAGES = ("parts", "sft", "mpo", "grpo", "bench")
QUICKSTART_TAGS = ("sft/loss", "mpo/loss", "mpo/reward_margin", "train/reward_mean", "train/accuracy",
                   "ssb/effective_ratio_fresh", "ssb/effective_ratio_batch", "ssb/size")
ABLATION_TAGS = ("ssb/effective_ratio_batch", "ssb/effective_ratio_fresh", "train/accuracy", "train/reward_mean",
                 "train/rm_reward")
# Second-half means an ablation reports when its runs logged them (train/rm_reward: the calibrated
# reward-model term of Eq. 7, 0 with the reward model off).
ABLATION_OPTIONAL = {"train/rm_reward": "rm_reward_second_half", "train/format_reward": "format_reward_second_half"}
CEILING_MARGIN = 0.25
"""The quickstart's goal: held-out accuracy after GRPO at least the constant-guess ceiling plus 25 points."""


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _second_half(series) -> list[float]:
    steps, values = series
    cut = len(steps) // 2
    return values[cut:]


def _stage_seconds(logs: Path, name: str) -> Optional[float]:
    start, end = logs / f"{name}_start.t", logs / f"{name}_end.t"
    if start.is_file() and end.is_file():
        return float(end.read_text()) - float(start.read_text())
    return None


def prompt_tasks(split: Path) -> dict[str, tuple[str, str]]:
    """``{prompt id: (task, answer)}`` of a synthetic split: the task from metadata.jsonl (the
    answer type where a split has none)."""
    meta = split / "metadata.jsonl"
    tasks = {row["id"]: row["task"] for row in read_jsonl(meta)} if meta.is_file() else {}
    return {row["id"]: (tasks.get(row["id"], row["answer_type"]), str(row["answer"]))
            for row in read_jsonl(split / "prompts.jsonl")}


def constant_guess(train: dict[str, tuple[str, str]], heldout: dict[str, tuple[str, str]]) -> dict:
    """The best a model that never looks can do: each task's most common training answer
    (ties: the first seen), scored on the held-out prompts, overall and per task."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for task, answer in train.values():
        counts[task][answer] += 1
    guess = {task: counter.most_common(1)[0][0] for task, counter in counts.items()}
    hits: dict[str, list[bool]] = defaultdict(list)
    for task, answer in heldout.values():
        hits[task].append(guess.get(task) == answer)
    every = [h for group in hits.values() for h in group]
    return {"accuracy": sum(every) / len(every),
            "by_task": {t: {"answer": guess.get(t), "accuracy": sum(h) / len(h)} for t, h in sorted(hits.items())}}


def accuracy_by_task(samples: Path, heldout: dict[str, tuple[str, str]]) -> dict[str, float]:
    """Per-task accuracy (pass@1) of an evaluation's ``samples.jsonl`` (``evaluate.runner``)."""
    hits: dict[str, list[float]] = defaultdict(list)
    for row in read_jsonl(samples):
        if row["id"] not in heldout:
            raise ValueError(f"{samples}: prompt {row['id']!r} is not in the held-out split")
        responses = row["responses"]
        hits[heldout[row["id"]][0]].append(sum(bool(r["correct"]) for r in responses) / len(responses))
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}


def _goals(acc: dict, ceiling: dict, by_task: dict) -> dict:
    final = by_task["after_grpo"]
    return {
        "after_sft_beats_start": acc["after_sft"] > acc["start"],
        "after_mpo_beats_after_sft": acc["after_mpo"] > acc["after_sft"],
        "after_grpo_beats_after_mpo": acc["after_grpo"] > acc["after_mpo"],
        "after_grpo_points_over_ceiling": round(100 * (acc["after_grpo"] - ceiling["accuracy"]), 2),
        "after_grpo_at_least_ceiling_plus_25_points": acc["after_grpo"] >= ceiling["accuracy"] + CEILING_MARGIN,
        "after_grpo_beats_constant_guess_on_every_task": all(
            final.get(task, 0.0) > entry["accuracy"] for task, entry in ceiling["by_task"].items()),
    }


def quickstart(run_dir: Path, started: Optional[float]) -> dict:
    evals = {}
    for stage in STAGES:
        path = run_dir / f"eval_{stage}" / "result.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the quickstart's evaluation of '{stage}' did not finish")
        evals[stage] = json.loads(path.read_text())
    heldout = prompt_tasks(run_dir / "data" / "heldout")
    ceiling = constant_guess(prompt_tasks(run_dir / "data" / "train"), heldout)
    by_task = {s: accuracy_by_task(run_dir / f"eval_{s}" / "samples.jsonl", heldout) for s in STAGES}
    runs = {name: load_scalars(run_dir / "tb" / name) for name in ("sft", "mpo", "grpo")}
    acc = {s: evals[s]["pass@1"] for s in STAGES}
    grpo = runs["grpo"]
    summary = {
        "accuracy": acc,
        "ceiling": ceiling["accuracy"],
        "ceiling_by_task": ceiling["by_task"],
        "accuracy_by_task": by_task,
        "format": {s: evals[s]["format"] for s in STAGES},
        "heldout_prompts": evals["start"]["num_items"],
        "seconds": round(time.time() - started, 1) if started else None,
        "stage_seconds": {name: _stage_seconds(run_dir / "logs", name) for name in TRAINING_STAGES},
        "steps": {name: len(next(iter(scalars.values()))[0]) for name, scalars in runs.items()},
        "grpo_second_half": {tag: _mean(_second_half(grpo[tag])) for tag in
                             ("train/accuracy", "ssb/effective_ratio_fresh", "ssb/effective_ratio_batch")
                             if tag in grpo},
        "goals": _goals(acc, ceiling, by_task),
    }
    suite = run_dir / "benchmarks" / "suite.json"
    if suite.is_file():  # the public-format evaluation of the GRPO model (step 10)
        summary["benchmarks"] = json.loads(suite.read_text())["benchmarks"]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_runs({"SFT": runs["sft"], "MPO": runs["mpo"], "GRPO + SSB": grpo},
              [t for t in QUICKSTART_TAGS if any(t in r for r in runs.values())], run_dir / "curves.png",
              title="quickstart: tiny R1V from parts, SFT, MPO, GRPO + SSB (CPU, TP=2)")
    _print_quickstart(summary, run_dir)
    return summary


def _print_quickstart(summary: dict, run_dir: Path) -> None:
    acc, by_task, ceiling = summary["accuracy"], summary["accuracy_by_task"], summary["ceiling_by_task"]
    print()
    print(f"{'held-out accuracy':<24}" + "".join(f"{label:>12}" for label in STAGE_LABELS) + f"{'ceiling':>12}")
    print(f"{'  answer correct':<24}" + "".join(f"{100 * acc[s]:>11.1f}%" for s in STAGES)
          + f"{100 * summary['ceiling']:>11.1f}%")
    for task, entry in ceiling.items():
        print(f"{'    ' + task:<24}" + "".join(f"{100 * by_task[s].get(task, 0.0):>11.1f}%" for s in STAGES)
              + f"{100 * entry['accuracy']:>11.1f}%")
    print(f"{'  R1 format':<24}" + "".join(f"{100 * summary['format'][s]:>11.1f}%" for s in STAGES))
    seconds = summary["stage_seconds"]
    print(f"({summary['heldout_prompts']} held-out prompts, greedy; ceiling: each task's most common training "
          f"answer; total {summary['seconds']} s; parts {seconds['parts']} s, SFT {seconds['sft']} s, "
          f"MPO {seconds['mpo']} s, GRPO {seconds['grpo']} s, benchmarks {seconds['bench']} s)")
    for row in summary.get("benchmarks", []):
        print(f"{row['name']:<24} pass@1 {100 * row['pass@1']:5.1f}%  pass@{row['k']} {100 * row['pass@k']:5.1f}%  "
              f"({row['num_items']} items, mean {row['mean_tokens']} tokens, truncated "
              f"{100 * row['truncation_rate']:.1f}%)")
    print(f"wrote {run_dir / 'summary.json'}, {run_dir / 'curves.png'}; "
          f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")


def ablation(runs_arg: list[str], out: Path) -> dict:
    runs = {}
    for spec in runs_arg:
        label, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"--run {spec!r}: expected LABEL=DIR")
        runs[label] = (Path(path), load_scalars(path))
    result = {}
    for label, (path, scalars) in runs.items():
        for tag in ("ssb/effective_ratio_batch", "train/accuracy"):
            if tag not in scalars:
                raise KeyError(f"run {label} ({path}) has no scalar {tag!r}")
        steps, batch_ratio = scalars["ssb/effective_ratio_batch"]
        entry = {
            "steps": len(steps),
            "effective_ratio_batch_second_half": _mean(_second_half(scalars["ssb/effective_ratio_batch"])),
            "effective_ratio_fresh_second_half": _mean(_second_half(scalars["ssb/effective_ratio_fresh"])),
            "train_accuracy_second_half": _mean(_second_half(scalars["train/accuracy"])),
            **{key: _mean(_second_half(scalars[tag])) for tag, key in ABLATION_OPTIONAL.items() if tag in scalars},
            "final": {tag: scalars[tag][1][-1] for tag in ABLATION_TAGS if tag in scalars},
        }
        eval_file = path / "eval" / "result.json"
        if eval_file.is_file():
            entry["heldout_accuracy"] = json.loads(eval_file.read_text())["pass@1"]
        result[label] = entry
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_runs({label: scalars for label, (_, scalars) in runs.items()},
              [tag for tag in ABLATION_TAGS if any(tag in scalars for _, scalars in runs.values())],
              out / "ablation.png", title="GRPO with and without the Selective Sample Buffer")
    print()
    print(f"{'run':<16}{'eff. ratio (2nd half)':>24}{'fresh ratio':>14}{'train acc.':>12}{'rm reward':>12}"
          f"{'held-out acc.':>15}")
    for label, e in result.items():
        held, rm = e.get("heldout_accuracy"), e.get("rm_reward_second_half")
        print(f"{label:<16}{e['effective_ratio_batch_second_half']:>24.3f}{e['effective_ratio_fresh_second_half']:>14.3f}"
              f"{e['train_accuracy_second_half']:>12.3f}{'-' if rm is None else f'{rm:.4f}':>12}"
              f"{'-' if held is None else f'{held:.3f}':>15}")
    print(f"wrote {out / 'ablation.json'}, {out / 'ablation.png'}")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart")
    q.add_argument("--run-dir", type=Path, required=True)
    q.add_argument("--started", type=float, help="the run's start (seconds since the epoch) for summary.json")
    a = sub.add_parser("ablation")
    a.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (TensorBoard events under it)")
    a.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "quickstart":
            quickstart(args.run_dir, args.started)
        else:
            ablation(args.run, args.out)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
