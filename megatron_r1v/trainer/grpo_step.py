"""GRPO forward/backward (Eq. 8) through Megatron-Core's pipeline schedules (``trainer.schedule``).

A micro-batch is a packed row (``data.packing.PackedMicroBatch``) plus per-position
vectors aligned with its next-token ``labels``: behaviour log-probs, reference
log-probs, each response's advantage and the Eq. 8 normalization weight (see
``losses.grpo.token_weights``). The last pipeline stage applies the fused vocab-parallel
kernels to its ``[L, V/tp]`` logits, so PP and TP work as in pre-training.

Scaling: Megatron's schedule divides each micro-batch loss by the number of
micro-batches and DDP averages gradients over data-parallel ranks, while the weights
already normalize over the whole step (every micro-batch of every rank). The loss given
to the schedule is therefore multiplied by both counts; the gradient is then exactly
that of -J (Eq. 8) for the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch

from megatron_r1v.data.packing import PackedMicroBatch
from megatron_r1v.losses.grpo import GRPOLossConfig, grpo_policy_loss
from megatron_r1v.losses.grpo_variants import segment_ids
from megatron_r1v.platform import ParallelContext
from megatron_r1v.trainer.schedule import label_targets, packed_batch, row_logits, run_schedule, sum_over_step


def make_grpo_microbatch(
    packed: PackedMicroBatch,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """The schedule's micro-batch dict; per-position vectors are ``[L]`` (zeros if not given)."""
    length = packed.input_ids.shape[1]
    zeros = torch.zeros(length, dtype=torch.float32)
    batch = packed_batch(packed)
    batch.update({
        "old_logprobs": (zeros if old_logprobs is None else old_logprobs.float())[None],
        "ref_logprobs": (zeros if ref_logprobs is None else ref_logprobs.float())[None],
        "advantages": (zeros if advantages is None else advantages.float())[None],
        "weights": (zeros if weights is None else weights.float())[None],
    })
    for key in ("old_logprobs", "ref_logprobs", "advantages", "weights"):
        if batch[key].shape != (1, length):
            raise ValueError(f"{key} must be [L] = [{length}], got {tuple(batch[key].shape[1:])}")
    return batch


def _grpo_loss_func(cfg: GRPOLossConfig, ctx: ParallelContext, scale: float, metrics: list, batch: dict,
                    logits_BLv: torch.Tensor):
    labels_L, mask_L = label_targets(batch)
    # GSPO's sequence ratio averages over each packed response (grpo.importance_level sequence).
    segments_L = segment_ids(batch["cu_seqlens"], labels_L.shape[0]) if cfg.importance_level == "sequence" else None
    # inplace: backward writes d/dlogits over the logits buffer (nothing reads the logits
    # after the loss), so no second [L, V/tp] tensor is allocated (kernels/vocab_parallel.py).
    out = grpo_policy_loss(
        row_logits(logits_BLv), labels_L, batch["old_logprobs"][0], batch["ref_logprobs"][0], batch["advantages"][0],
        mask_L, batch["weights"][0], cfg, tp_group=ctx.tp_group, inplace=True, segment_ids=segments_L,
    )
    metrics.append({"loss": float(out.loss.detach()), "kl": out.kl_mean, "clip_fraction": out.clip_fraction,
                    "tokens": float(mask_L.sum())})
    return out.loss * scale, {"grpo_loss": out.loss.detach().clone()}


@dataclass
class GRPOStepResult:
    loss: float
    """-J of the step (sum of weighted token losses over all micro-batches and DP ranks)."""
    kl: Optional[float]
    clip_fraction: float
    per_microbatch: list[dict] = field(default_factory=list)


def grpo_forward_backward(model, microbatches: list[dict], ctx: ParallelContext, cfg: GRPOLossConfig) -> GRPOStepResult:
    """Forward and backward of every micro-batch; gradients are left in the DDP buffers."""
    metrics: list[dict] = []
    scale = float(len(microbatches) * ctx.dp)
    run_schedule(model, microbatches, ctx, partial(_grpo_loss_func, cfg, ctx, scale, metrics), forward_only=False)
    sums = [0.0] * 4
    if ctx.is_last_stage:
        sums = [sum(m["loss"] for m in metrics), sum((m["kl"] or 0.0) * m["tokens"] for m in metrics),
                sum(m["clip_fraction"] * m["tokens"] for m in metrics), sum(m["tokens"] for m in metrics)]
    # Each rank's weights already carry the global normalization: the DP sum is -J.
    loss, kl_sum, clipped_sum, tokens = sum_over_step(sums, ctx).tolist()
    n_tokens = max(tokens, 1.0)
    return GRPOStepResult(loss, kl_sum / n_tokens if cfg.kl_beta else None, clipped_sum / n_tokens, metrics)
