"""Training entry point: ``torchrun --nproc_per_node N -m megatron_r1v.train --config RECIPE [--set a.b=c]``.

Runs the stage ``train.stage`` names (``trainer/build.py`` builds it):

- ``mpo``: Mixed Preference Optimization on preference pairs (``trainer/mpo.py``);
  reference log-probs are computed once and cached (``trainer/reference_cache.py``).
- ``grpo``: GRPO with the hybrid reward, the Selective Sample Buffer and one rollout
  engine per data-parallel replica (``trainer/grpo.py``).

Both start from ``model.checkpoint`` (a Megatron checkpoint written by
``tools/convert_checkpoint.py import``, or the ``model/`` folder of an earlier stage's
training checkpoint) or random weights, print one progress line per step and write the
TensorBoard scalars ``trainer/metrics.py`` declares under ``logging.tensorboard_dir``. With
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
import logging
import sys
from typing import Optional, Sequence

from megatron_r1v.config import RunConfig, add_config_args, load_config
from megatron_r1v.validation import preflight


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
        cfg = load_config(args.config, args.overrides)  # validation.validate_config: every value
        preflight(cfg)  # validation.preflight: the inputs exist, the settings can run on this machine
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
    done = saved = start
    try:
        with _metrics_logger(cfg, ctx, args.metrics_jsonl) as logger:
            end = cfg.train.steps if args.stop_after is None else min(cfg.train.steps, start + args.stop_after)
            for step in range(start, end):
                if stopper.agreed(ctx.device):
                    break
                lr = float(trainer.optimizer.param_groups[0]["lr"])
                metrics = trainer.step(step)
                scheduler.step(1)
                done = step + 1
                interval = cfg.train.save_interval
                if cfg.train.save_dir and ((interval and done % interval == 0) or done in (cfg.train.steps, end)):
                    save_checkpoint(cfg.train.save_dir, done, trainer, ctx)
                    saved = done
                logger.log(step, metrics, lr)
        _finish(cfg, ctx, trainer, stopper, done, saved)
    finally:
        destroy_distributed(ctx)
    return 0


def _metrics_logger(cfg: RunConfig, ctx, jsonl_path: Optional[str]):
    from megatron_r1v.trainer.metrics import MetricsLogger, stage_tags

    tags = stage_tags(cfg.train.stage, tis=cfg.rollout.tis_cap is not None, device=ctx.device)
    return MetricsLogger(tags, stage=cfg.train.stage, total_steps=cfg.train.steps,
                         log_interval=cfg.logging.log_interval, device=ctx.device, is_rank0=ctx.rank == 0,
                         tensorboard_dir=cfg.logging.tensorboard_dir, jsonl_path=jsonl_path)


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
