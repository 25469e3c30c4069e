"""Sync vs one-step-off async rollout on the same GRPO run: the trainer's own command
(``torchrun -m megatron_r1v.train``) once per mode, ``--set rollout.mode=sync|async``, and
the per-step metrics it logs (``perf/step_time_s``, ``perf/rollout_wait_s``,
``perf/overlap_s``, ``perf/train_time_s``, ``rollout/logprob_abs_diff``). Prints one JSON
object: each mode's medians over the steps after the first (the first has nothing to overlap
with) and async / sync ratios.

    python tools/bench_async_rollout.py --config examples/configs/tiny_grpo_cpu.yaml --nproc 2 \\
        --set data.train_path=data/synth/prompts.jsonl --set data.tokenizer=data/synth/tokenizer

Without ``data.train_path`` it writes a synthetic set and tokenizer into ``--work`` first (the
tiny recipe's inputs; random weights, so rewards are flat and the loss is ~0, but every phase
runs and is timed). On a 2-core CPU the engine process competes with the trainer ranks for
cores; the comparison that matters is on GPUs with the engines on GPUs of their own
(``rollout.engine_gpu_offset``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KEYS = ("perf/step_time_s", "perf/rollout_wait_s", "perf/overlap_s", "perf/train_time_s",
        "perf/rollout_time_s", "rollout/logprob_abs_diff")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/configs/tiny_grpo_cpu.yaml", help="the GRPO recipe")
    parser.add_argument("--nproc", type=int, default=2, help="trainer ranks (torchrun --nproc_per_node)")
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps per mode (>= 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for both runs")
    parser.add_argument("--work", help="folder for the inputs it makes and the runs' metrics (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step of a run has nothing to overlap with)")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_async_"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides)
    if not any(o.startswith("data.train_path=") for o in overrides):
        overrides += _synthetic_inputs(work)
    result = {"config": args.config, "nproc": args.nproc, "steps": args.steps, "overrides": overrides}
    for mode in ("sync", "async"):
        result[mode] = _medians(_run(args, mode, overrides, work))
    result["async_over_sync"] = {k: result["async"][k] / result["sync"][k] for k in KEYS
                                 if result["sync"][k] not in (0, None)}
    print(json.dumps(result, indent=1))
    return 0


def _synthetic_inputs(work: Path) -> list[str]:
    from megatron_r1v.data.synthetic import generate_dataset
    from megatron_r1v.data.tokenizer import build_tokenizer

    generate_dataset(work / "data", 64, seed=0)
    build_tokenizer([work / "data" / "prompts.jsonl", work / "data" / "preferences.jsonl"], 640, work / "tok")
    return [f"data.train_path={work / 'data' / 'prompts.jsonl'}", f"data.tokenizer={work / 'tok'}"]


def _run(args, mode: str, overrides: list[str], work: Path) -> list[dict]:
    metrics = work / f"{mode}.jsonl"
    metrics.unlink(missing_ok=True)
    sets = [f"train.steps={args.steps}", "logging.tensorboard_dir=null", "train.save_dir=null",
            *overrides, f"rollout.mode={mode}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "megatron_r1v.train", "--config", args.config, "--metrics-jsonl", str(metrics)]
    for item in sets:
        command += ["--set", item]
    print(f"[bench_async_rollout] {mode}: {args.steps} steps", file=sys.stderr, flush=True)
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"error: the {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _medians(steps: list[dict]) -> dict:
    later = steps[1:]
    return {k: statistics.median(m.get(k, 0.0) for m in later) for k in KEYS}


if __name__ == "__main__":
    raise SystemExit(main())
