"""SFT forward/backward (``losses.sft``) through Megatron-Core's schedules.

A micro-batch is a packed row of whole conversations (``data.packing.pack_conversations``)
with their images; the labels mark the assistant replies (``data.template``). The last
pipeline stage turns its ``[L, V/tp]`` logits into per-token log-probs with the fused
vocab-parallel kernel (in place: its backward writes d/dlogits over the logits buffer) and
evaluates :func:`losses.sft.sft_loss`, so TP and PP work as in pre-training.

The mean (``losses.sft``): the step's loss is the sum of the token NLLs of every assistant
token of the step divided by N, the step's assistant tokens over all micro-batches and
data-parallel ranks (counted by the trainer before the step). Each micro-batch returns its
summed NLL / N, multiplied by the number of micro-batches and the DP size, which Megatron's
schedule (a mean over micro-batches) and DDP (a mean over DP ranks) divide by again; so the
gradient is that of the token mean, whatever the packing and layout. The reported loss is
the same quantity, from the per-rank sums reduced with :func:`trainer.schedule.sum_over_step`.
With context parallelism each CP rank's loss covers its own tokens of the row (the schedule
splits it); Megatron's schedule multiplies it by the CP size and DDP averages over DP x CP, so
the same ``len(microbatches) * dp`` scale gives the gradient of the token mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from megatron_r1v.data.packing import PackedMicroBatch
from megatron_r1v.kernels import vocab_parallel_logprobs
from megatron_r1v.losses.sft import sft_loss
from megatron_r1v.platform import ParallelContext
from megatron_r1v.trainer.schedule import label_targets, packed_batch, row_logits, run_schedule, sum_over_step

# Sums reduced over the pipeline and DP groups (one TP rank's): the step's NLL and its token count.
_SUMS = ("nll", "tokens")


def make_sft_microbatch(packed: PackedMicroBatch) -> dict[str, torch.Tensor]:
    """The schedule's micro-batch dict of a packed row of conversations."""
    return packed_batch(packed)


def _sft_loss_func(step_tokens: int, ctx: ParallelContext, scale: float, sums: list, batch: dict,
                   logits_BLv: torch.Tensor):
    labels_L, mask_L = label_targets(batch)
    # inplace: backward writes d/dlogits over the logits buffer (nothing reads them later).
    logp_L, _ = vocab_parallel_logprobs(row_logits(logits_BLv), labels_L, tp_group=ctx.tp_group, inplace=True)
    loss = sft_loss(logp_L, mask_L, step_tokens)
    sums.append([float(-(logp_L.detach() * mask_L).sum()), float(mask_L.sum())])
    return loss * scale, {"sft_loss": loss.detach().clone()}


@dataclass
class SFTStepResult:
    """The step's token-mean loss and what it was taken over (all micro-batches, all DP ranks)."""

    loss: float
    tokens: int
    """Assistant tokens of the step (N of ``losses.sft``)."""


def sft_forward_backward(model, microbatches: list[dict], ctx: ParallelContext, step_tokens: int) -> SFTStepResult:
    """Forward and backward of every micro-batch (``step_tokens``: N, the assistant tokens of
    the step over all DP ranks); gradients are left in the DDP buffers."""
    sums: list = []
    scale = float(len(microbatches) * ctx.dp)
    run_schedule(model, microbatches, ctx, partial(_sft_loss_func, step_tokens, ctx, scale, sums), forward_only=False)
    totals = torch.zeros(len(_SUMS), dtype=torch.float64)
    # TP ranks compute the same sums: count one of them. CP ranks sum their own tokens of each
    # row (the NLL is a token sum), so every CP rank counts; sum_over_step adds them up.
    if ctx.is_last_stage and ctx.tp_rank == 0 and sums:
        totals = torch.tensor(sums, dtype=torch.float64).sum(0)
    t = dict(zip(_SUMS, sum_over_step(totals, ctx, over_tp=True).tolist()))
    assert int(t["tokens"]) == step_tokens, f"the step's rows hold {t['tokens']} assistant tokens, not {step_tokens}"
    return SFTStepResult(t["nll"] / step_tokens, step_tokens)
