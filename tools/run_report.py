"""Summaries of the example runs: ``summary.json``, a PNG of their curves and a table.

    python tools/run_report.py quickstart --run-dir runs/quickstart [--started EPOCH_S]
    python tools/run_report.py ablation --run with_ssb=DIR --run without_ssb=DIR --out DIR

``quickstart`` reads what examples/quickstart.sh left in the run folder (eval_*.json from
``python -m megatron_r1v.evaluate``, TensorBoard events under tb/mpo and tb/grpo, stage
timestamps under logs/) and writes ``summary.json`` (accuracies as fractions) and
``curves.png``. ``ablation`` compares GRPO runs (examples/ssb_ablation.sh): the
effective-sample ratio of the batches and the accuracy per step in one PNG, and each
run's final numbers in ``ablation.json``. Both print a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_r1v.plotting import load_scalars, plot_runs

STAGES = ("start", "after_mpo", "after_grpo")
QUICKSTART_TAGS = ("mpo/loss", "mpo/reward_margin", "mpo/accuracy", "train/reward_mean", "train/accuracy",
                   "ssb/effective_ratio_fresh", "ssb/effective_ratio_batch", "ssb/size")
ABLATION_TAGS = ("ssb/effective_ratio_batch", "ssb/effective_ratio_fresh", "train/accuracy", "train/reward_mean",
                 "train/rm_reward")
# Second-half means an ablation reports when its runs logged them (train/rm_reward: the calibrated
# reward-model term of Eq. 7, 0 with the reward model off).
ABLATION_OPTIONAL = {"train/rm_reward": "rm_reward_second_half", "train/format_reward": "format_reward_second_half"}


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


def quickstart(run_dir: Path, started: Optional[float]) -> dict:
    evals = {}
    for stage in STAGES:
        path = run_dir / f"eval_{stage}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the quickstart's evaluation of '{stage}' did not finish")
        evals[stage] = json.loads(path.read_text())
    runs = {name: load_scalars(run_dir / "tb" / name) for name in ("mpo", "grpo")}
    acc = {s: evals[s]["accuracy"] for s in STAGES}
    grpo = runs["grpo"]
    summary = {
        "accuracy": acc,
        "format": {s: evals[s]["format"] for s in STAGES},
        "heldout_prompts": evals["start"]["num_prompts"],
        "seconds": round(time.time() - started, 1) if started else None,
        "stage_seconds": {name: _stage_seconds(run_dir / "logs", name) for name in ("mpo", "grpo")},
        "steps": {name: len(next(iter(scalars.values()))[0]) for name, scalars in runs.items()},
        "grpo_second_half": {tag: _mean(_second_half(grpo[tag])) for tag in
                             ("train/accuracy", "ssb/effective_ratio_fresh", "ssb/effective_ratio_batch")
                             if tag in grpo},
        "goals": {
            "after_mpo_beats_start": acc["after_mpo"] > acc["start"],
            "after_grpo_gain_points": round(100 * (acc["after_grpo"] - acc["start"]), 2),
            "after_grpo_gain_at_least_15_points": acc["after_grpo"] - acc["start"] >= 0.15,
        },
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_runs({"MPO": runs["mpo"], "GRPO + SSB": grpo}, [t for t in QUICKSTART_TAGS if any(t in r for r in
                                                                                            runs.values())],
              run_dir / "curves.png", title="quickstart: tiny R1V2, MPO then GRPO + SSB (CPU, TP=2)")
    print()
    print(f"{'held-out accuracy':<22}{'start':>10}{'after MPO':>12}{'after GRPO':>12}")
    print(f"{'  answer correct':<22}" + "".join(f"{100 * acc[s]:>{w}.1f}%" for s, w in zip(STAGES, (9, 11, 11))))
    print(f"{'  R1 format':<22}" + "".join(f"{100 * summary['format'][s]:>{w}.1f}%"
                                           for s, w in zip(STAGES, (9, 11, 11))))
    print(f"({summary['heldout_prompts']} held-out prompts, greedy; total {summary['seconds']} s; "
          f"MPO {summary['stage_seconds']['mpo']} s, GRPO {summary['stage_seconds']['grpo']} s)")
    print(f"wrote {run_dir / 'summary.json'}, {run_dir / 'curves.png'}; TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    return summary


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
        eval_file = path / "eval.json"
        if eval_file.is_file():
            entry["heldout_accuracy"] = json.loads(eval_file.read_text())["accuracy"]
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
