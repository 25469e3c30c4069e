"""The metrics of one GRPO step (``trainer/grpo.py``): rewards, loss terms, entropy, engine
gap, TIS, timings, the SSB plan's and dynamic sampling's counts, reduced over the world."""

from __future__ import annotations

from typing import Optional

from megatron_r1v.config import RunConfig
from megatron_r1v.platform import ParallelContext
from megatron_r1v.trainer.grpo_batch import (
    DynamicSamplingStats,
    ScoredGroup,
    StepBatch,
    StepSums,
    kl_penalty_sum,
    overlong_sum,
)
from megatron_r1v.trainer.grpo_comm import sum_over_world
from megatron_r1v.trainer.grpo_step import GRPOStepResult


def step_metrics(cfg: RunConfig, ctx: ParallelContext, groups: list[ScoredGroup], result: GRPOStepResult,
                 batch: StepBatch, sums: StepSums, grad_norm: Optional[float], seconds: dict[str, float],
                 sampling: Optional[DynamicSamplingStats] = None) -> dict[str, float]:
    """Every tag of a GRPO step (``trainer/metrics.py``), the same on every rank: ``sums`` are
    this rank's, reduced here over the world; ``seconds`` the step's phases (``PhaseTimer``)
    and the owner's ``rollout_wait`` / ``overlap``."""
    # Rewards are the same on every rank of a replica and the entropy on every TP rank
    # of the last stage: one rank of each contributes, then one sum over the world.
    overlong = kl_penalty = 0.0
    if ctx.tp_rank == 0 and ctx.is_first_stage:
        sums.add_rewards(groups)
        overlong, kl_penalty = overlong_sum(groups), kl_penalty_sum(groups)
    if not (ctx.tp_rank == 0 and ctx.is_last_stage):
        sums.entropy_sum = sums.entropy_tokens = sums.gap_sum = sums.gap_tokens = 0.0
        sums.tis_sum = sums.tis_truncated = 0.0
    *values, overlong, kl_penalty = sum_over_world(sums.as_list() + [overlong, kl_penalty])
    t = StepSums.from_list(values)
    count, fresh_tokens = max(t.responses, 1.0), max(t.gap_tokens, 1.0)
    metrics = {
        "train/reward_mean": t.reward_total / count, "train/accuracy": t.reward_rule / count,
        "train/format_reward": t.reward_format / count, "train/rm_reward": t.reward_model / count,
        "reward/overlong_penalty": overlong / count,
        "train/grpo_loss": result.loss, "train/kl": result.kl or 0.0, "train/clip_fraction": result.clip_fraction,
        "train/entropy": t.entropy_sum / max(t.entropy_tokens, 1.0), "train/response_length":
            t.response_tokens / count, "train/grad_norm": float(grad_norm or 0.0),
        "perf/step_time_s": seconds["step"], "perf/rollout_time_s": seconds["rollout"],
        "perf/train_time_s": seconds["train"], "perf/weight_sync_time_s": seconds["weight_sync"],
        "perf/data_time_s": seconds["data"], "perf/rollout_wait_s": seconds["rollout_wait"],
        "perf/overlap_s": seconds["overlap"],
        "rollout/logprob_abs_diff": t.gap_sum / fresh_tokens,
    }
    if cfg.rollout.effective_tis_cap is not None:
        metrics["rollout/tis_weight_mean"] = t.tis_sum / fresh_tokens
        metrics["rollout/tis_truncated_fraction"] = t.tis_truncated / fresh_tokens
    if cfg.grpo.kl_placement == "reward":
        # The KL is in the rewards: train/kl is the fresh responses' per-token mean (every fresh
        # response token carries a loss), measured before the update.
        metrics["train/kl_penalty"] = kl_penalty / count
        metrics["train/kl"] = kl_penalty / cfg.grpo.kl_beta / max(t.response_tokens, 1.0)
    if sampling is not None:
        metrics.update(sampling.metrics())
    metrics.update(batch.plan.stats.metrics())
    return metrics
