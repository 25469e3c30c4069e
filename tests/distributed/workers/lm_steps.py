"""Causal-LM steps for the test workers: token-mean cross-entropy through the trainer's
schedule (``megatron_r1v.trainer.schedule``). The decoder and R1V parity / training tests
use a plain LM loss; the trainer itself trains only with the MPO and GRPO losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
from megatron.core import tensor_parallel

from megatron_r1v.platform import ParallelContext
from megatron_r1v.trainer.schedule import optimizer_step, run_schedule, sum_over_step


@dataclass
class LMStepResult:
    loss: float
    """Mean of the micro-batch losses over all data-parallel ranks (every rank receives it)."""
    logits: list = field(default_factory=list)
    """Per micro-batch vocab-parallel logits [B, S, V_pad/tp] (last stage, keep_logits)."""


def _lm_loss(keep: Optional[list], batch: dict, logits_BSv: torch.Tensor):
    if keep is not None:
        # A copy: Megatron's vocab-parallel CE works in place on its input, which shares
        # storage with the logits whenever transpose().contiguous() is a no-op (B == 1).
        keep.append(logits_BSv.detach().clone())
    # Megatron's vocab-parallel CE takes sequence-first [S, B, V/tp] logits.
    token_loss_SB = tensor_parallel.vocab_parallel_cross_entropy(
        logits_BSv.transpose(0, 1).float().contiguous(), batch["labels"].transpose(0, 1).contiguous())
    mask_SB = batch["loss_mask"].transpose(0, 1)
    loss = (token_loss_SB * mask_SB).sum() / mask_SB.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the micro-batch count.
    return loss, {"lm_loss": loss.detach().clone()}


def lm_forward_backward(model, microbatches: list[dict], ctx: ParallelContext, *, forward_only: bool = False,
                        keep_logits: bool = False) -> LMStepResult:
    """Runs every micro-batch forward (and backward); returns the mean loss."""
    keep: Optional[list] = [] if keep_logits else None
    losses = run_schedule(model, microbatches, ctx, partial(_lm_loss, keep), forward_only)
    sums = [sum(float(item["lm_loss"]) for item in losses), len(losses)] if ctx.is_last_stage else [0.0, 0.0]
    loss_sum, count = sum_over_step(sums, ctx).tolist()
    return LMStepResult(loss=loss_sum / count, logits=keep or [])


def lm_train_step(ddp_model, optimizer, microbatches: list[dict], ctx: ParallelContext) -> tuple[float, Optional[float]]:
    """One optimizer step over ``microbatches``; returns (mean loss, grad norm)."""
    result, grad_norm = optimizer_step(ddp_model, optimizer, lambda: lm_forward_backward(ddp_model, microbatches, ctx),
                                       "LM step")
    return result.loss, grad_norm
