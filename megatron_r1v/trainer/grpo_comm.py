"""Collectives and small records of the GRPO step (``trainer/grpo.py``): moving a replica's
rollout and the last stage's log-probs to every rank that needs them, world sums of metrics,
the failure record an engine owner broadcasts, and the per-phase wall clock."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_r1v.platform import ParallelContext


def broadcast_to_replica(obj, ctx: ParallelContext):
    """``obj`` from the replica's first TP rank of the first stage to all of its ranks."""
    holder = [obj]
    if ctx.pp > 1:  # first along the pipeline (the tp_rank-0 chain carries the object) ...
        dist.broadcast_object_list(holder, src=dist.get_global_rank(ctx.pp_group, 0), group=ctx.pp_group)
    if ctx.tp > 1:  # ... then to each stage's TP peers
        dist.broadcast_object_list(holder, src=dist.get_global_rank(ctx.tp_group, 0), group=ctx.tp_group)
    return holder[0]


def broadcast_from_last_stage(values: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """``values`` as the replica's first TP rank of the last pipeline stage holds them, on every
    rank of the replica (log-probs exist on the last stage only; its TP ranks agree after the
    vocab-parallel reduction, rank 0's copy makes it bit-exact)."""
    out = values.to(ctx.device)
    if ctx.tp > 1:  # within each stage: its TP rank 0's copy (the last stage's is the one that matters) ...
        dist.broadcast(out, src=dist.get_global_rank(ctx.tp_group, 0), group=ctx.tp_group)
    if ctx.pp > 1:  # ... then back along each TP rank's pipeline chain from the last stage
        dist.broadcast(out, src=dist.get_global_rank(ctx.pp_group, ctx.pp - 1), group=ctx.pp_group)
    return out.cpu()


def sum_over_world(values: list[float]) -> list[float]:
    """Sums of per-rank values over every rank (fp64)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@dataclass(frozen=True)
class RolloutFailed:
    """What the engine owner broadcasts instead of groups when its rollout phase failed."""

    message: str


class PhaseTimer:
    """Wall-clock seconds per named phase of a step (``with timer.phase("rollout"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
