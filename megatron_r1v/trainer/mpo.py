"""The MPO stage of R1V2 (report section 3.2): one optimizer step per :meth:`MPOTrainer.step`.

    preference pairs (data.pairs: ready-made, or built from scored responses by reward
    margin) -> tiles + chat template (data.loader.PairLoader) -> pack whole pairs ->
    BCO's delta (mpo.bco_delta; trl_running_mean: a forward-only pass for this step's
    rewards first) -> Eq. 2-5 forward/backward through Megatron's schedules
    (trainer.mpo_step) -> optimizer step -> fold the step's implicit rewards into the
    running mean

The running mean holds every implicit reward of the completed steps whatever
``mpo.bco_delta`` is (the modes differ only in the delta they read from it), so a run
may resume under another mode.

The reference log-probs come from :mod:`trainer.reference_cache`, computed once with
the initial policy before the first step. Checkpoints (``trainer/checkpoint.py``) keep
the model, optimizer, data cursor and delta's running mean, so ``--resume`` continues
exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_r1v.config import RunConfig
from megatron_r1v.data.loader import PairLoader
from megatron_r1v.data.packing import pack_pairs
from megatron_r1v.losses.mpo import MPOLossConfig, RewardMean, bco_delta
from megatron_r1v.models.r1v.context_parallel import packing_multiple
from megatron_r1v.platform import ParallelContext
from megatron_r1v.trainer.failure import StepFailure, StepSnapshot, agree_on_failure, describe
from megatron_r1v.trainer.mpo_step import make_mpo_microbatch, mpo_forward_backward, step_reward_sums
from megatron_r1v.trainer.reference_cache import ReferenceLogprobs
from megatron_r1v.trainer.schedule import optimizer_step
from megatron_r1v.trainer.setup import ModelStage


def loss_config(cfg: RunConfig) -> MPOLossConfig:
    m = cfg.mpo
    return MPOLossConfig(beta=m.beta, preference_weight=m.preference_weight, quality_weight=m.quality_weight,
                         generation_weight=m.generation_weight, nll_normalization=m.nll_normalization)


@dataclass
class MPOTrainer:
    cfg: RunConfig
    ctx: ParallelContext
    stage: ModelStage
    ddp: torch.nn.Module
    optimizer: object
    loader: PairLoader
    reference: ReferenceLogprobs
    reward_mean: RewardMean = field(default_factory=RewardMean)
    """The running mean of all completed steps' implicit rewards, BCO's delta's source (Eq. 4)."""

    def __post_init__(self):
        self.loss_cfg = loss_config(self.cfg)

    def _microbatches(self, items) -> list[dict]:
        out = []
        seq_multiple = packing_multiple(self.ctx.cp, self.ctx.tp, self.cfg.parallel.sequence_parallel)
        for mb in pack_pairs(items, self.cfg.mpo.micro_batch_tokens, pipeline=self.ctx.pp > 1,
                             seq_multiple=seq_multiple):
            row = {sample: pos for pos, sample in enumerate(mb.sample_indices)}
            pairs = sorted({k // 2 for k in mb.sample_indices})
            refs = [self.reference[items[k].record.id] for k in pairs]
            out.append(make_mpo_microbatch(mb, [(row[2 * k], row[2 * k + 1]) for k in pairs],
                                           [c for c, _ in refs], [r for _, r in refs]))
        return out

    def _delta(self, microbatches: list[dict]) -> float:
        """BCO's delta for this step (``losses.mpo.bco_delta``); leaves the running mean as it is."""
        mode = self.cfg.mpo.bco_delta
        if mode != "trl_running_mean":
            return bco_delta(mode, self.reward_mean)
        total, n = step_reward_sums(self.ddp, microbatches, self.ctx, self.loss_cfg.beta)
        return bco_delta(mode, self.reward_mean, total, n)

    def step(self, step: int) -> dict[str, float]:
        ctx, t_start = self.ctx, time.perf_counter()
        self.loader.take_data_seconds()  # from here on: this step's pairs
        items, failure = [], None
        try:
            items = self.loader.next_batch(self.cfg.mpo.pairs_per_step)
            missing = [it.record.id for it in items if it.record.id not in self.reference]
            if missing:
                raise KeyError(f"no reference log-probs for pairs {missing[:3]}: the reference cache does not "
                               "match this run's data")
        except Exception as err:  # a data error on any rank stops every rank, safely (trainer/failure.py)
            failure = describe(err)
        agree_on_failure(failure, ctx.device, ctx.rank)
        count = torch.tensor([float(len(items))], dtype=torch.float64, device=ctx.device)
        torch.distributed.all_reduce(count, group=ctx.dp_group)
        microbatches = self._microbatches(items)
        delta = self._delta(microbatches)
        try:
            result, grad_norm = optimizer_step(
                self.ddp, self.optimizer,
                lambda: mpo_forward_backward(self.ddp, microbatches, ctx, self.loss_cfg, delta, int(count.item())),
                f"step {step}")
        except FloatingPointError as err:  # on every rank; the optimizer skipped the update
            raise StepFailure(describe(err), recoverable=True) from None
        # After the step in every mode: trl_running_mean's pre-pass saw the same rewards (same weights).
        self.reward_mean.update_sum((result.reward_chosen + result.reward_rejected) * result.pairs, 2 * result.pairs)
        return {
            "mpo/loss": result.loss, "mpo/pref_loss": result.preference, "mpo/quality_loss": result.quality,
            "mpo/gen_loss": result.generation, "mpo/reward_margin": result.reward_margin,
            "mpo/accuracy": result.accuracy, "mpo/delta": delta, "mpo/chosen_reward": result.reward_chosen,
            "mpo/rejected_reward": result.reward_rejected, "train/grad_norm": float(grad_norm or 0.0),
            "perf/step_time_s": time.perf_counter() - t_start, "perf/data_time_s": self.loader.take_data_seconds(),
        }

    # -- a failed step (trainer/failure.py) --------------------------------------------------
    def snapshot(self) -> StepSnapshot:
        return StepSnapshot.take(self.loader, {"reward_mean": self.reward_mean.state_dict()})

    def restore(self, snapshot: StepSnapshot) -> None:
        snapshot.restore(self.loader)
        self.reward_mean.load_state_dict(snapshot.extra["reward_mean"])

    # -- checkpoint hooks (trainer/checkpoint.py) ------------------------------------------
    def rank_state(self) -> dict:
        return {"reward_mean": self.reward_mean.state_dict()}

    def load_rank_state(self, state: dict) -> None:
        self.reward_mean.load_state_dict(state["reward_mean"])

    def save_files(self, directory: Path, step: int) -> None:
        """Nothing beyond the model, optimizer and cursor: the reference log-probs are keyed
        on the initial checkpoint and data, not on training progress."""

    def load_files(self, directory: Path) -> None:
        """See :meth:`save_files`."""
