"""Training entry point: ``torchrun --nproc_per_node N -m megatron_r1v.train --config RECIPE [--set a.b=c]``.

Runs the stage ``train.stage`` names (``trainer/build.py`` builds it):

- ``sft``: supervised fine-tuning on conversations, the token-mean NLL of every assistant
  reply (``trainer/sft.py``).
- ``mpo``: Mixed Preference Optimization on preference pairs (``trainer/mpo.py``);
  reference log-probs are computed once and cached (``trainer/reference_cache.py``).
- ``grpo``: GRPO with the hybrid reward, the Selective Sample Buffer and one rollout
  engine per data-parallel replica (``trainer/grpo.py``).

Each starts from ``model.checkpoint`` (a Megatron checkpoint written by
``tools/convert_checkpoint.py import``, or the ``model/`` folder of an earlier stage's
training checkpoint) or random weights, print one progress line per step and write the
TensorBoard scalars ``trainer/metrics.py`` declares under ``logging.tensorboard_dir``. With
``train.save_dir`` they write a training checkpoint every ``train.save_interval`` steps
and at the end (``trainer/checkpoint.py``); ``--resume`` continues from the newest one
there, exactly as the uninterrupted run would.

SIGTERM, SIGUSR1 (Slurm's warning before the time limit, forwarded by torchrun) or
SIGINT makes every rank finish the current step, write a checkpoint and exit 0
(``trainer/stop.py``); ``<train.save_dir>/run_status.json`` says from the start how far
the run got and how it ended, which the Slurm scripts read to requeue the job. A step
that fails before the weights changed (reward server down, unreadable image, non-finite
gradients) stops every rank with a checkpoint of the state before it and exit status 1
(``trainer/failure.py``). One trainer per ``train.save_dir`` (a lock); a run without
``--resume`` refuses a folder holding checkpoints unless ``--force`` moves them aside
(``trainer/run_folder.py``). Exit status: 0 done or stopped by a signal, 1 a failure
(one ``error:`` line), 2 a bad config, flag or run folder (before any work).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from megatron_r1v.config import RunConfig, add_config_args, load_config
from megatron_r1v.trainer.run_folder import RunFolderError, RunFolderLock, exit_with_launcher, prepare_save_dir
from megatron_r1v.validation import preflight


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--metrics-jsonl", help="also append each step's metrics to this file (rank 0)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in train.save_dir (an error when there is none)")
    parser.add_argument("--force", action="store_true",
                        help="start over in a train.save_dir that holds checkpoints: they move into "
                             "<save_dir>/replaced-<time>/ first (without it such a folder is an error)")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="stop after N steps of this invocation, writing a checkpoint there (needs "
                             "train.save_dir); the schedule still spans train.steps, and --resume continues")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)  # validation.validate_config: every value
        preflight(cfg)  # validation.preflight: the inputs exist, the settings can run on this machine
        _check_arguments(cfg, args)
    except (ValueError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from megatron_r1v.checkpoint.hf_io import CheckpointError
    from megatron_r1v.trainer.stop import GracefulStop

    # Handlers go in before the (long) build: a signal during it stops the run at step 0.
    with GracefulStop() as stopper:
        exit_with_launcher()
        try:
            with _run_folder(cfg, args):
                return _train(cfg, args, stopper)
        except RunFolderError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except CheckpointError as err:  # a damaged or mismatched checkpoint: named, no traceback
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1


def _check_arguments(cfg: RunConfig, args: argparse.Namespace) -> None:
    """The command-line flags against the config and the run folder (every rank, before any work)."""
    for flag, given in (("--resume", args.resume), ("--force", args.force),
                        ("--stop-after", args.stop_after is not None)):
        if given and not cfg.train.save_dir:
            raise ValueError(f"{flag} needs train.save_dir")
    if args.resume and args.force:
        raise ValueError("--resume continues the run in train.save_dir and --force starts it over: give one")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    if cfg.train.save_dir:
        prepare_save_dir(cfg.train.save_dir, resume=args.resume, force=args.force, move=False)
    if args.resume:
        from megatron_r1v.trainer.checkpoint import latest_checkpoint

        try:
            latest = latest_checkpoint(cfg.train.save_dir)
        except FileNotFoundError as err:
            raise ValueError(f"--resume: {err}") from None
        if latest is None:
            raise ValueError(f"--resume: no checkpoint in {cfg.train.save_dir} (no {cfg.train.save_dir}/latest)")


@contextmanager
def _run_folder(cfg: RunConfig, args: argparse.Namespace) -> Iterator[None]:
    """Rank 0 holds the run folder's lock for the whole run, moves an old run aside with
    --force, and writes the ``running`` status (``trainer/run_folder.py``)."""
    from megatron_r1v.trainer.checkpoint import checkpoint_step
    from megatron_r1v.trainer.stop import write_run_status

    if not cfg.train.save_dir or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with RunFolderLock(cfg.train.save_dir):
        prepare_save_dir(cfg.train.save_dir, resume=args.resume, force=args.force, move=True)
        newest = checkpoint_step(cfg.train.save_dir) if args.resume else None
        write_run_status(cfg.train.save_dir, newest[0] if newest else 0, cfg.train.steps, None, state="running",
                         checkpoint=newest[1] if newest else None)
        yield


def _train(cfg: RunConfig, args: argparse.Namespace, stopper) -> int:
    from megatron_r1v.platform import destroy_distributed
    from megatron_r1v.trainer.build import build_trainer
    from megatron_r1v.trainer.failure import StepFailure

    progress, ctx = _Progress(cfg), None
    try:
        trainer, ctx = build_trainer(cfg, _init_layout(cfg) if args.resume else None)
        stopper.rank = ctx.rank
        scheduler = _resume(cfg, args, trainer, ctx, progress)
        _loop(cfg, args, trainer, ctx, stopper, scheduler, progress)
        _finish(cfg, ctx, trainer, stopper, progress)
    except StepFailure as failure:  # on every rank (trainer/failure.py)
        _stop_on_failure(cfg, ctx, trainer, progress, failure)
        return 1
    except BaseException as err:
        progress.write_status(None, state="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if ctx is not None:
            destroy_distributed(ctx)
    return 0


def _init_layout(cfg: RunConfig) -> Optional[dict]:
    """The TP/PP at which the newest checkpoint's run drew its random initial weights."""
    from megatron_r1v.trainer.checkpoint import init_layout, latest_checkpoint

    latest = latest_checkpoint(cfg.train.save_dir)
    return init_layout(latest) if latest is not None else None


def _resume(cfg: RunConfig, args: argparse.Namespace, trainer, ctx, progress: "_Progress"):
    """With --resume, the newest checkpoint's state; the LR scheduler at the step reached."""
    from megatron_r1v.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from megatron_r1v.trainer.setup import build_lr_scheduler

    if args.resume:
        latest = latest_checkpoint(cfg.train.save_dir)  # exists: _check_arguments made sure
        progress.resumed(load_checkpoint(latest, trainer, ctx), latest.name)
        if ctx.rank == 0:
            print(f"resumed from {latest} after step {progress.done}", flush=True)
    scheduler = build_lr_scheduler(trainer.optimizer, cfg.optimizer, cfg.train.steps)
    if progress.done:
        scheduler.step(progress.done)  # the schedule is a function of the step count alone
    return scheduler


class _Progress:
    """Steps done, the newest checkpoint on disk, and the status file that reports them."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.done, self.checkpoint = cfg, 0, None
        self.is_rank0 = int(os.environ.get("RANK", "0")) == 0  # known before the build, which may fail

    def resumed(self, step: int, name: str) -> None:
        self.done, self.checkpoint = step, name

    def save(self, trainer, ctx) -> None:
        from megatron_r1v.trainer.checkpoint import save_checkpoint

        self.checkpoint = save_checkpoint(self.cfg.train.save_dir, self.done, trainer, ctx).name

    @property
    def saved(self) -> bool:
        return self.checkpoint == f"step_{self.done:06d}"

    def write_status(self, signal_name: Optional[str], *, state: str, error: Optional[str] = None) -> None:
        from megatron_r1v.trainer.stop import write_run_status

        if self.is_rank0 and self.cfg.train.save_dir:
            write_run_status(self.cfg.train.save_dir, self.done, self.cfg.train.steps, signal_name, state=state,
                             error=error, checkpoint=self.checkpoint)


def _loop(cfg: RunConfig, args, trainer, ctx, stopper, scheduler, progress: _Progress) -> None:
    from megatron_r1v.trainer.failure import StepFailure

    with _metrics_logger(cfg, ctx, args.metrics_jsonl) as logger:
        start = progress.done
        end = cfg.train.steps if args.stop_after is None else min(cfg.train.steps, start + args.stop_after)
        for step in range(start, end):
            if stopper.agreed(ctx.device):
                break
            lr = float(trainer.optimizer.param_groups[0]["lr"])
            snapshot = trainer.snapshot()
            try:
                metrics = trainer.step(step)
            except StepFailure as failure:
                if failure.recoverable:  # back to the state after the previous step
                    trainer.restore(snapshot)
                raise
            scheduler.step(1)
            progress.done = step + 1
            interval = cfg.train.save_interval
            if cfg.train.save_dir and ((interval and progress.done % interval == 0)
                                       or progress.done in (cfg.train.steps, end)):
                progress.save(trainer, ctx)
            logger.log(step, metrics, lr)


def _metrics_logger(cfg: RunConfig, ctx, jsonl_path: Optional[str]):
    from megatron_r1v.trainer.metrics import MetricsLogger, stage_tags

    tags = stage_tags(cfg.train.stage, tis=cfg.rollout.effective_tis_cap is not None, device=ctx.device)
    return MetricsLogger(tags, stage=cfg.train.stage, total_steps=cfg.train.steps,
                         log_interval=cfg.logging.log_interval, device=ctx.device, is_rank0=ctx.rank == 0,
                         tensorboard_dir=cfg.logging.tensorboard_dir, jsonl_path=jsonl_path)


def _stop_on_failure(cfg: RunConfig, ctx, trainer, progress: _Progress, failure) -> None:
    """A step failed on some rank: a stop checkpoint of the state after the last finished
    step when the failure left it consistent, the ``failed`` status, one error line."""
    progress.write_status(None, state="failed", error=str(failure))
    if failure.recoverable and cfg.train.save_dir and progress.done and not progress.saved:
        progress.save(trainer, ctx)
        progress.write_status(None, state="failed", error=str(failure))
    if ctx.rank != 0:
        return
    if progress.saved:
        where = f"checkpoint {cfg.train.save_dir}/{progress.checkpoint} holds the state after step {progress.done}; " \
                "fix the cause and continue with --resume"
    elif not failure.recoverable:
        where = (f"no stop checkpoint: the weights had already changed in step {progress.done + 1}; the newest "
                 f"checkpoint is {progress.checkpoint or 'none'}")
    else:
        where = "no checkpoint written (" + ("train.save_dir is not set" if not cfg.train.save_dir
                                             else "no step had finished") + ")"
    print(f"error: step {progress.done + 1}/{cfg.train.steps} failed: {failure}\n{where}", file=sys.stderr,
          flush=True)


def _finish(cfg: RunConfig, ctx, trainer, stopper, progress: _Progress) -> None:
    """After the loop: the stop checkpoint (when a signal cut the run short) and the status file."""
    # Collective: a signal that came during the last step reached only some ranks.
    reason = stopper.signal if stopper.agreed(ctx.device) else None
    if reason and cfg.train.save_dir and not progress.saved and progress.done:
        progress.save(trainer, ctx)
    state = "finished" if progress.done >= cfg.train.steps else "stopped"
    progress.write_status(reason, state=state)
    if ctx.rank != 0 or not reason:
        return
    if not cfg.train.save_dir:
        where = "no checkpoint written (train.save_dir is not set)"
    elif progress.saved:
        where = f"checkpoint {cfg.train.save_dir}/{progress.checkpoint}; continue with --resume"
    else:  # a signal before the first step of a fresh run (during the model build)
        where = "no checkpoint written (no step had finished)"
    print(f"stopped by {reason} after step {progress.done}/{cfg.train.steps}: {where}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
