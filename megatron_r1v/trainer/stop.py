"""Graceful stop on SIGTERM / SIGUSR1 / SIGINT, and the run's status file.

Clusters end jobs with a signal: Slurm sends ``--signal=USR1@T`` T seconds before the
time limit (and SIGTERM on ``scancel`` or preemption), and torchrun forwards the signals
it handles to its workers (SIGINT too: Ctrl-C in the terminal of an interactive run). A
worker that gets one finishes the step it is in, writes a checkpoint and exits 0, so a
requeued job resumes without losing the step.

A signal reaches the ranks at different moments (or only some of them: ``kill`` of one
worker), so the decision to stop is collective: before each step every rank contributes
its flag to one all-reduce (MAX), and all ranks stop after the same step.

``<train.save_dir>/run_status.json`` (rank 0, written atomically) tells the launcher what
happened. It is written when the run starts (``state: running``), and again when it ends::

    {"completed_steps": 7, "total_steps": 500, "finished": false, "signal": "SIGUSR1",
     "state": "stopped", "error": null, "checkpoint": "step_000007"}

``state`` is ``running``, ``finished`` (every step of ``train.steps`` done), ``stopped``
(a signal or ``--stop-after``) or ``failed`` (``error`` says why); ``finished`` is true
once every step is done; ``signal`` names the signal that stopped the run (null
otherwise); ``checkpoint`` the newest complete checkpoint in the folder (null: none,
e.g. a signal during the model build of a fresh run).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_r1v.atomic_dir import write_text_atomic

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
RUN_STATUS = "run_status.json"
RUN_STATES = ("running", "finished", "stopped", "failed")


class GracefulStop:
    """Installs handlers for :data:`STOP_SIGNALS` that only record the signal; the training
    loop asks :meth:`agreed` before each step. Use as a context manager, which restores
    the previous handlers on exit."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.signal: Optional[str] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = name
            # os.write: print() is not safe inside a signal handler (re-entrant stdout).
            os.write(sys.stderr.fileno(), f"[rank {self.rank}] received {name}: stopping after the current step, "
                                          "with a checkpoint\n".encode())

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank got a stop signal (collective over the world);
        afterwards :attr:`signal` names it on every rank (SIGTERM wins over SIGUSR1)."""
        number = torch.tensor([float(signal.Signals[self.signal]) if self.signal else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(number, op=dist.ReduceOp.MAX)
        if number.item():
            self.signal = signal.Signals(int(number.item())).name
        return bool(number.item())


def write_run_status(save_dir: str | os.PathLike, completed_steps: int, total_steps: int,
                     stopped_by: Optional[str], *, state: str, error: Optional[str] = None,
                     checkpoint: Optional[str] = None) -> Path:
    """Writes ``run_status.json`` atomically (``atomic_dir.write_text_atomic``; module docstring)."""
    if state not in RUN_STATES:
        raise ValueError(f"run state must be one of {RUN_STATES}, got {state!r}")
    status = {"completed_steps": completed_steps, "total_steps": total_steps,
              "finished": completed_steps >= total_steps, "signal": stopped_by, "state": state,
              "error": error, "checkpoint": checkpoint}
    return write_text_atomic(Path(save_dir) / RUN_STATUS, json.dumps(status) + "\n")
