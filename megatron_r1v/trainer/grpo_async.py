"""One-step-off asynchronous rollout (``rollout.mode: async``): step k+1's responses are
generated while step k trains.

The order of a step k in async mode (``GRPOTrainer.step``):

    take step k's rollout (generated during step k-1 from W_{k-1}; step 0's: started now)
    -> score it -> weight sync W_k into the engine (idle now) -> draw step k+1's prompts and
    start their generation from W_k -> train step k (W_k -> W_{k+1}) while the engine generates

so every batch is sampled from the weights one optimizer step before the ones it trains
(step 0's from its own): the staleness bound of 1, checked on every rank at every take from the
version (optimizer steps in the engine's weights) each rollout records. The ratio of Eq. 8 is
taken against the trainer's log-probs before the update, as in sync mode, and every fresh token
is weighted by min(pi_old / pi_engine, tis_cap): the engine's log-probs are those of the
behaviour policy that sampled it (AReaL's decoupled PPO objective, arXiv 2505.24298 Eq. 5, with
the truncation of ``losses.grpo.truncated_is_weights``; ``RolloutConfig.effective_tis_cap``).

The engine runs in a process of its own (``rollout/engine_process.py``), started by the replica's
owner rank; the other ranks of the replica draw the same prompts (the loader is deterministic)
and receive the scored groups by broadcast, as in sync mode.

Exactness. A checkpoint written after step k holds step k+1's rollout, whose generation is
waited for first (:meth:`OneStepOffRollout.settle`): ``pending_rollout/dp_NNNNN.pt``, one file
per DP replica, with the prompts' record ids, their positions in the step's global batch and
the generated samples. ``--resume`` re-prepares those prompts, hands each DP rank its positions
(so a changed DP size shares them out as the loader would have) and trains step k+1 on the
saved samples: the resumed run continues as the uninterrupted one. When the generation had
failed (the run stopped on that failure), only the prompts are saved and ``--resume`` generates
them again from the resumed weights. A failed step puts back the rollout it took and discards
the one it started (:meth:`OneStepOffRollout.restore`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_r1v.data.loader import PromptItem, PromptLoader
from megatron_r1v.platform import ParallelContext
from megatron_r1v.rollout.engine import RolloutRequest, RolloutSample, SamplingParams
from megatron_r1v.rollout.engine_process import EngineProcess, EngineProcessError
from megatron_r1v.trainer.failure import describe

MAX_STALENESS = 1
"""Optimizer steps between the weights that sample a batch and the weights that train on it."""
PENDING_DIR = "pending_rollout"


@dataclass
class PendingRollout:
    """One step's prompts on every rank of a replica and, on its owner, their generation."""

    step: int
    items: list[PromptItem]
    positions: list[int]
    """Each item's position in the step's global prompt list (``PromptLoader.next_share``)."""
    version: int
    """Optimizer steps in the weights that generate it."""
    samples: Optional[list[list[RolloutSample]]] = None
    error: Optional[str] = None
    running: bool = False
    regenerate: bool = False
    """A checkpoint held its prompts only (the generation had failed): generated at the take."""
    generate_seconds: float = 0.0
    wait_seconds: float = 0.0

    @property
    def overlap_seconds(self) -> float:
        """Seconds of the generation that ran while the trainer did other work."""
        return max(0.0, self.generate_seconds - self.wait_seconds)


class OneStepOffRollout:
    """The rollout in flight and the one being trained on (module docstring). ``engine``: the
    replica's engine process on its owner rank, None elsewhere. ``params_of(step)``: the
    sampling parameters of a step (its seed)."""

    def __init__(self, ctx: ParallelContext, loader: PromptLoader, engine: Optional[EngineProcess],
                 prompts_per_step: int, params_of: Callable[[int], SamplingParams]) -> None:
        self.ctx, self.loader, self.engine = ctx, loader, engine
        self.prompts_per_step, self.params_of = prompts_per_step, params_of
        self.pending: Optional[PendingRollout] = None

    def draw(self, step: int, version: int) -> Optional[str]:
        """Every rank: this rank's share of ``step``'s prompts (the data cursor advances); the
        owner starts generating them. The failure's description, or None."""
        try:
            share = self.loader.next_share(self.prompts_per_step)
        except Exception as err:  # any: a data error; the caller agrees on it over the ranks
            return describe(err)
        self.pending = PendingRollout(step, [item for _, item in share], [p for p, _ in share], version)
        self._start(self.pending)
        return None

    def take(self, step: int, version: int) -> PendingRollout:
        """``step``'s rollout, its generation finished on the owner (started first when a resumed
        checkpoint held only its prompts). Raises on every rank when it is not ``step``'s or is
        staler than :data:`MAX_STALENESS`."""
        pending = self.pending
        if pending is None or pending.step != step:
            raise RuntimeError(f"async rollout: step {step + 1} has no rollout in flight "
                               f"(held: {None if pending is None else pending.step + 1})")
        if pending.regenerate:  # on every rank: the version is checked on every rank
            pending.version, pending.regenerate = version, False  # generated now, from the resumed weights
            self._start(pending)
        if not 0 <= version - pending.version <= MAX_STALENESS:
            raise RuntimeError(f"async rollout: step {step + 1} trains weights of version {version} on responses "
                               f"sampled at version {pending.version}; the bound is {MAX_STALENESS} step(s)")
        self.settle()
        return pending

    def settle(self) -> None:
        """Owner: waits for the generation in flight and keeps its samples (or its failure)."""
        pending = self.pending
        if pending is None or not pending.running:
            return
        try:
            result = self.engine.finish_generate()
            pending.samples = result.samples
            pending.generate_seconds, pending.wait_seconds = result.generate_seconds, result.wait_seconds
        except EngineProcessError as err:
            pending.error = describe(err)
        pending.running = False

    def _start(self, pending: PendingRollout) -> None:
        if self.engine is None:
            return
        try:
            self.engine.start_generate(rollout_requests(pending.items, pending.positions),
                                       self.params_of(pending.step))
            pending.running = True
        except EngineProcessError as err:
            pending.error = describe(err)

    # -- a failed step (trainer/failure.py) ---------------------------------------------------
    def snapshot(self) -> Optional[PendingRollout]:
        return self.pending

    def restore(self, snapshot: Optional[PendingRollout]) -> None:
        """Back to the rollout the step began with; one it started since is waited for and dropped."""
        if self.pending is not snapshot:
            self.settle()
        self.pending = snapshot

    # -- checkpoints (trainer/checkpoint.py) ---------------------------------------------------
    def save(self, directory: Path) -> None:
        """Owner of each DP replica (CP rank 0): its share of the rollout in flight, settled first."""
        pending = self.pending
        if pending is None or self.engine is None or self.ctx.cp_rank != 0:
            return
        self.settle()
        samples = None
        if pending.samples is not None:
            samples = [[_sample_record(s) for s in group] for group in pending.samples]
        folder = directory / PENDING_DIR
        folder.mkdir(exist_ok=True)
        torch.save({"step": pending.step, "version": pending.version, "dp": self.ctx.dp,
                    "positions": pending.positions, "record_ids": [i.record.id for i in pending.items],
                    "samples": samples, "error": pending.error}, folder / f"dp_{self.ctx.dp_rank:05d}.pt")

    def load(self, directory: Path) -> None:
        """Every rank: the checkpoint's rollout in flight (none: the next step draws its own),
        this DP rank's positions of it re-prepared; the owner gets their samples."""
        self.pending = None
        shares = sorted((directory / PENDING_DIR).glob("dp_*.pt")) if (directory / PENDING_DIR).is_dir() else []
        if not shares:
            return
        saved = [torch.load(f, weights_only=False) for f in shares]
        _check_shares(saved, shares)
        by_position = {p: (rid, None if s["samples"] is None else s["samples"][k])
                       for s in saved for k, (p, rid) in enumerate(zip(s["positions"], s["record_ids"]))}
        mine = [p for p in sorted(by_position) if p % self.ctx.dp == self.ctx.dp_rank]
        records = []
        for p in mine:
            try:
                records.append(self.loader.record(by_position[p][0]))
            except KeyError as err:
                raise ValueError(f"{directory / PENDING_DIR}: {err.args[0]} (data.train_path)") from None
        items = self.loader.prepare_many(records)
        kept = [(p, item) for p, item in zip(mine, items, strict=True) if item is not None]
        first = saved[0]
        regenerate = any(s["samples"] is None for s in saved)
        self.pending = PendingRollout(first["step"], [item for _, item in kept], [p for p, _ in kept],
                                      first["version"], regenerate=regenerate)
        if self.engine is not None and not regenerate:
            self.pending.samples = [[_sample_of(rec) for rec in by_position[p][1]] for p, _ in kept]
        if regenerate and self.ctx.rank == 0:
            print(f"async rollout: the checkpoint holds step {first['step'] + 1}'s prompts without their responses "
                  f"(its generation had failed: {next(s['error'] for s in saved if s['samples'] is None)}); "
                  "they are generated again from the resumed weights", flush=True)


def rollout_requests(items: list[PromptItem], positions: list[int]) -> list[RolloutRequest]:
    """The engine's requests for prompts at these positions of the step's global order: each
    position is its prompt's random stream (``RolloutRequest.stream``), so a prompt's samples
    do not depend on which DP replica generates it, nor beside which other prompts."""
    return [RolloutRequest(i.record.id, i.prompt_ids, i.pixel_values, stream=p)
            for i, p in zip(items, positions, strict=True)]


def _check_shares(saved: list[dict], files: list[Path]) -> None:
    """The DP shares of one checkpoint's rollout: one step, one version, every replica's file."""
    steps = {(s["step"], s["version"], s["dp"]) for s in saved}
    if len(steps) != 1:
        raise ValueError(f"{files[0].parent}: the shares disagree on (step, version, dp): {sorted(steps)}")
    dp = saved[0]["dp"]
    if len(saved) != dp:
        raise ValueError(f"{files[0].parent}: {len(saved)} share files for the {dp} DP replicas that wrote them")


def _sample_record(sample: RolloutSample) -> dict:
    return {"prompt_id": sample.prompt_id, "response_ids": sample.response_ids.cpu(),
            "logprobs": sample.logprobs.cpu(), "finished": sample.finished, "text": sample.text}


def _sample_of(record: dict) -> RolloutSample:
    return RolloutSample(record["prompt_id"], record["response_ids"], record["logprobs"], record["finished"],
                         record["text"])
