"""Training entry point: ``torchrun --nproc_per_node N -m megatron_r1v.train --config RECIPE [--set a.b=c]``.

Runs the stage ``train.stage`` names (``trainer/build.py`` builds it):

- ``mpo``: Mixed Preference Optimization on preference pairs (``trainer/mpo.py``);
  reference log-probs are computed once and cached (``trainer/reference_cache.py``).
- ``grpo``: GRPO with the hybrid reward, the Selective Sample Buffer and one rollout
  engine per data-parallel replica (``trainer/grpo.py``).

Both start from ``model.checkpoint`` (a Megatron checkpoint written by
``tools/convert_checkpoint.py import``, or the ``model/`` folder of an earlier stage's
training checkpoint) or random weights, print one progress line per step and write the
TensorBoard scalars of their ``TAGS`` under ``logging.tensorboard_dir``. With
``train.save_dir`` they write a training checkpoint every ``train.save_interval`` steps
and at the end (``trainer/checkpoint.py``); ``--resume`` continues from the newest one
there, exactly as the uninterrupted run would.

SIGTERM or SIGUSR1 (Slurm's warning before the time limit, forwarded by torchrun)
makes every rank finish the current step, write a checkpoint and exit 0
(``trainer/stop.py``); ``<train.save_dir>/run_status.json`` then says how far the run
got and whether it finished, which the Slurm scripts read to requeue the job.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from megatron_r1v.config import RunConfig, add_config_args, load_config


def preflight(cfg: RunConfig) -> None:
    """Settings the chosen stage needs, each error naming its key."""
    for key, value in (("data.train_path", cfg.data.train_path), ("data.tokenizer", cfg.data.tokenizer)):
        if not value:
            raise ValueError(f"{key} must be set for the {cfg.train.stage} stage")
    if cfg.train.stage == "mpo":
        m = cfg.mpo
        if m.micro_batch_tokens < 2 * cfg.train.seq_length:
            raise ValueError(f"mpo.micro_batch_tokens ({m.micro_batch_tokens}) must be >= 2 * train.seq_length "
                             f"({2 * cfg.train.seq_length}): a pair's two sequences share a micro-batch")
        if m.data_format == "scored" and m.margin_threshold is None:
            raise ValueError("mpo.margin_threshold must be set with mpo.data_format=scored (the report uses 7, 10 "
                             "or 15)")
        if m.pairs_per_step < 1 or m.max_pairs_per_prompt < 0:
            raise ValueError("mpo.pairs_per_step must be >= 1 and mpo.max_pairs_per_prompt >= 0")
        return
    if cfg.grpo.micro_batch_tokens < cfg.train.seq_length:
        raise ValueError(f"grpo.micro_batch_tokens ({cfg.grpo.micro_batch_tokens}) must be >= train.seq_length "
                         f"({cfg.train.seq_length}): a sample must fit one micro-batch")
    if not cfg.rollout.temperature > 0:
        raise ValueError(f"rollout.temperature must be > 0 for GRPO (the ratio of Eq. 8 needs sampling "
                         f"log-probs), got {cfg.rollout.temperature}")
    if cfg.grpo.ppo_epochs < 1:
        raise ValueError(f"grpo.ppo_epochs must be >= 1, got {cfg.grpo.ppo_epochs}")
    if cfg.rollout.engine == "sglang":
        import importlib.util

        import torch

        from megatron_r1v.trainer.build import sglang_model_dir

        sglang_model_dir(cfg)  # on every rank, before any collective: only owners build engines

        if not torch.cuda.is_available():
            raise ValueError("rollout.engine=sglang runs SGLang engines on the training GPUs and needs CUDA; "
                             "use rollout.engine=hf on a machine without GPUs")
        from megatron_r1v.rollout.sglang_engine import ROLLOUT_EXTRA

        if importlib.util.find_spec("sglang") is None:
            raise ValueError(f"rollout.engine=sglang: sglang is not installed ({ROLLOUT_EXTRA}, or use the "
                             "docker/Dockerfile image)")


def progress_line(stage: str, step: int, total: int, metrics: dict) -> str:
    if stage == "mpo":
        return (f"step {step + 1}/{total} | loss {metrics['mpo/loss']:.4f} (pref {metrics['mpo/pref_loss']:.4f}, "
                f"quality {metrics['mpo/quality_loss']:.4f}, gen {metrics['mpo/gen_loss']:.4f}) | "
                f"reward margin {metrics['mpo/reward_margin']:+.4f} | accuracy {metrics['mpo/accuracy']:.2f} | "
                f"delta {metrics['mpo/delta']:+.4f} | step time {metrics['perf/step_time_s']:.1f}s")
    return (f"step {step + 1}/{total} | reward {metrics['train/reward_mean']:.3f} | "
            f"accuracy {metrics['train/accuracy']:.3f} | effective ratio {metrics['ssb/effective_ratio_fresh']:.2f}"
            f" -> {metrics['ssb/effective_ratio_batch']:.2f} | loss {metrics['train/grpo_loss']:+.3e} | "
            f"step time {metrics['perf/step_time_s']:.1f}s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--metrics-jsonl", help="also append each step's metrics to this file (rank 0)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in train.save_dir (an error when there is none)")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="stop after N steps of this invocation, writing a checkpoint there (needs "
                             "train.save_dir); the schedule still spans train.steps, and --resume continues")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for flag, given in (("--resume", args.resume), ("--stop-after", args.stop_after is not None)):
        if given and not cfg.train.save_dir:
            print(f"error: {flag} needs train.save_dir", file=sys.stderr)
            return 2
    if args.stop_after is not None and args.stop_after < 1:
        print(f"error: --stop-after must be >= 1, got {args.stop_after}", file=sys.stderr)
        return 2
    from megatron_r1v.trainer.stop import GracefulStop

    # Handlers go in before the (long) build: a signal during it stops the run at step 0.
    with GracefulStop() as stopper:
        return _train(cfg, args, stopper)


def _train(cfg: RunConfig, args: argparse.Namespace, stopper) -> int:
    from megatron_r1v.platform import destroy_distributed
    from megatron_r1v.trainer.build import build_trainer
    from megatron_r1v.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_r1v.trainer.setup import build_lr_scheduler

    trainer, ctx = build_trainer(cfg)
    stopper.rank = ctx.rank
    start = 0
    if args.resume:
        latest = latest_checkpoint(cfg.train.save_dir)
        if latest is None:
            destroy_distributed(ctx)
            print(f"error: --resume: no checkpoint in {cfg.train.save_dir}", file=sys.stderr)
            return 2
        start = load_checkpoint(latest, trainer, ctx)
        if ctx.rank == 0:
            print(f"resumed from {latest} after step {start}", flush=True)
    scheduler = build_lr_scheduler(trainer.optimizer, cfg.optimizer, cfg.train.steps)
    if start:
        scheduler.step(start)  # the schedule is a function of the step count alone
    writer = None
    if ctx.rank == 0 and cfg.logging.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(cfg.logging.tensorboard_dir)
    done = saved = start
    try:
        end = cfg.train.steps if args.stop_after is None else min(cfg.train.steps, start + args.stop_after)
        for step in range(start, end):
            if stopper.agreed(ctx.device):
                break
            lr = float(trainer.optimizer.param_groups[0]["lr"])
            metrics = {**trainer.step(step), "train/lr": lr}
            scheduler.step(1)
            done = step + 1
            interval = cfg.train.save_interval
            if cfg.train.save_dir and ((interval and done % interval == 0) or done in (cfg.train.steps, end)):
                save_checkpoint(cfg.train.save_dir, done, trainer, ctx)
                saved = done
            if ctx.rank != 0:
                continue
            if step % cfg.logging.log_interval == 0 or step == cfg.train.steps - 1:
                print(progress_line(cfg.train.stage, step, cfg.train.steps, metrics), flush=True)
            if writer is not None:
                for tag, value in metrics.items():
                    writer.add_scalar(tag, value, step)
                writer.flush()
            if args.metrics_jsonl:
                with open(args.metrics_jsonl, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
        _finish(cfg, ctx, trainer, stopper, done, saved)
    finally:
        if writer is not None:
            writer.close()
        destroy_distributed(ctx)
    return 0


def _finish(cfg: RunConfig, ctx, trainer, stopper, done: int, saved: int) -> None:
    """After the loop: the stop checkpoint (when a signal cut the run short) and the status file."""
    from megatron_r1v.trainer.checkpoint import save_checkpoint
    from megatron_r1v.trainer.stop import write_run_status

    # Collective: a signal that came during the last step reached only some ranks.
    reason = stopper.signal if stopper.agreed(ctx.device) else None
    if reason and cfg.train.save_dir and saved != done:
        save_checkpoint(cfg.train.save_dir, done, trainer, ctx)
    if ctx.rank != 0:
        return
    if cfg.train.save_dir:
        write_run_status(cfg.train.save_dir, done, cfg.train.steps, reason)
    if reason:
        where = (f"checkpoint in {cfg.train.save_dir}; continue with --resume" if cfg.train.save_dir
                 else "no checkpoint written (train.save_dir is not set)")
        print(f"stopped by {reason} after step {done}/{cfg.train.steps}: {where}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
