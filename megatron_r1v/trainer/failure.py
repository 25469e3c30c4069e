"""Failures inside a training step, made safe: every rank learns of them, and when they
came before the weights changed, the run stops with a checkpoint of the last consistent
state instead of losing the steps since the last save.

A failure often happens on one rank only: the replica's engine owner scores the rollouts,
so only it sees a reward server that stays down past ``reward.model_retry_s``; one
data-parallel rank reads the image that disappeared. The others would wait for it in
their next collective until the NCCL timeout. So the step's phases that can fail this
way end in :func:`agree_on_failure` (one scalar all-reduce when nothing failed), after
which every rank raises the same :class:`StepFailure`.

A step is *recoverable* while the weights are untouched: everything it changed before
(the data cursor, the SSB's draw counter and draw counts, the RNG, MPO's running reward
mean) is restored from a :class:`StepSnapshot` taken when the step began, so the state is
exactly that after the previous step, and ``train.py`` writes it as a stop checkpoint
(``run_status.json``: ``failed``, with the error). ``--resume`` then continues as the
uninterrupted run would have. A non-finite gradient (the optimizer skipped its update)
is recoverable too; a failure after an optimizer step changed the weights is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_r1v.platform import first_failure


class StepFailure(RuntimeError):
    """A step failed; raised on every rank with the same message."""

    def __init__(self, message: str, *, recoverable: bool) -> None:
        super().__init__(message)
        self.recoverable = recoverable


def describe(err: BaseException) -> str:
    """``Type: message`` of an exception (the class name alone, not its module), the form
    run_status.json and the error line use."""
    return f"{type(err).__name__}: {err}"


def agree_on_failure(local: Optional[str], device: torch.device, rank: int = 0) -> None:
    """Collective over the world: raises :class:`StepFailure` (recoverable) on every rank
    when any rank passes a failure message, naming the first failing rank's."""
    first = first_failure(None if local is None else f"rank {rank}: {local}", device)
    if first is not None:
        raise StepFailure(first if dist.is_initialized() else local, recoverable=True)


@dataclass
class StepSnapshot:
    """What a step changes before its optimizer step, as it was when the step began."""

    loader_state: dict
    rng_state: torch.Tensor
    cuda_rng_states: Optional[list] = None
    extra: dict = field(default_factory=dict)
    """The trainer's own (e.g. the SSB's draw state, MPO's running reward mean)."""

    @classmethod
    def take(cls, loader, extra: Optional[dict] = None) -> "StepSnapshot":
        return cls(loader_state=loader.state_dict(), rng_state=torch.get_rng_state(),
                   cuda_rng_states=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                   extra=extra or {})

    def restore(self, loader) -> None:
        loader.load_state_dict(self.loader_state)
        torch.set_rng_state(self.rng_state)
        if self.cuda_rng_states is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng_states)
