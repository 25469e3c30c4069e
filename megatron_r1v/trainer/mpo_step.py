"""MPO forward/backward (Eq. 2-5) and sequence log-probs through Megatron-Core's schedules.

A micro-batch is a packed row holding whole preference pairs (``data.packing.pack_pairs``
keeps a pair's chosen and rejected sequences together), plus per-pair
vectors: the row positions of each pair's two sequences, their cached reference
log-probs and the chosen response's length. The last pipeline stage turns its
``[L, V/tp]`` logits into per-token log-probs with the fused vocab-parallel kernel, sums
them per sequence, and evaluates :func:`losses.mpo.mpo_pair_losses` for the pairs in the
row, so TP and PP work as in pre-training.

Scaling (as in ``grpo_step``): the step's loss is the mean over every pair of every
data-parallel rank. Each micro-batch returns its pairs' summed terms divided by the
global pair count, multiplied by the number of micro-batches and the DP size, which the
schedule and DDP divide by again.

The two options of ``losses.mpo`` whose "batch" is the whole step need step totals
before the loss: ``nll_normalization=token`` the step's mean chosen length (its chosen
tokens summed over micro-batches and DP ranks: one all-reduce of host-side counts), and
``bco_delta=trl_running_mean`` the step's implicit rewards under the current policy
(:func:`step_reward_sums`, a forward-only pass over the step's micro-batches).

Context parallelism: each CP rank holds part of every sequence of the row, so the per-sequence
log-prob sums are summed over the CP group (``context_parallel.sum_over_cp``, identity
backward) before the pair losses, which every CP rank then evaluates whole; their metrics are
counted once (CP rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch

from megatron_r1v.data.packing import PackedMicroBatch
from megatron_r1v.data.template import IGNORE_INDEX
from megatron_r1v.kernels import vocab_parallel_logprobs
from megatron_r1v.losses.mpo import MPOLossConfig, implicit_rewards, mpo_pair_losses
from megatron_r1v.models.r1v.context_parallel import CP_INDEX, sum_over_cp
from megatron_r1v.platform import ParallelContext
from megatron_r1v.trainer.schedule import (
    compute_logprobs,
    label_targets,
    packed_batch,
    row_logits,
    run_schedule,
    sum_over_step,
)

# Sums reduced over the pipeline and DP groups; their means are the step's metrics.
_SUMS = ("loss", "preference", "quality", "generation", "reward_chosen", "reward_rejected", "margin", "correct",
         "pairs")


def sequence_sums(values_L: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-segment sums ``[S]`` of a per-position vector ``[L]`` (segments from ``cu_seqlens``)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(values_L.device)
    segment_L = torch.repeat_interleave(torch.arange(len(lengths), device=values_L.device), lengths)
    return torch.zeros(len(lengths), dtype=values_L.dtype, device=values_L.device).index_add(0, segment_L, values_L)


def make_mpo_microbatch(
    packed: PackedMicroBatch,
    pairs: Sequence[tuple[int, int]],
    ref_chosen: Sequence[float],
    ref_rejected: Sequence[float],
) -> dict[str, torch.Tensor]:
    """The schedule's micro-batch dict. ``pairs``: (chosen, rejected) positions in the row's
    sample order; ``ref_*``: their summed reference log-probs (response tokens only)."""
    if not pairs or not len(pairs) == len(ref_chosen) == len(ref_rejected):
        raise ValueError(f"need one reference value per pair, got {len(pairs)} pairs, {len(ref_chosen)} chosen and "
                         f"{len(ref_rejected)} rejected values")
    targets_S = sequence_sums((packed.labels[0] != IGNORE_INDEX).long(), packed.cu_seqlens)
    chosen = torch.tensor([c for c, _ in pairs], dtype=torch.long)
    batch = packed_batch(packed)
    batch.update({
        "pair_chosen": chosen,
        "pair_rejected": torch.tensor([r for _, r in pairs], dtype=torch.long),
        "ref_chosen": torch.tensor(ref_chosen, dtype=torch.float32),
        "ref_rejected": torch.tensor(ref_rejected, dtype=torch.float32),
        "chosen_lengths": targets_S[chosen],
    })
    return batch


def _mpo_loss_func(cfg: MPOLossConfig, delta: float, pair_weight: float, ctx: ParallelContext, scale: float,
                   sums: list, batch: dict, logits_BLv: torch.Tensor, *, mean_chosen_length: Optional[float] = None):
    """The last stage's loss of one micro-batch; ``mean_chosen_length``: the step's, for
    ``nll_normalization=token`` (:func:`step_mean_chosen_length`)."""
    labels_L, mask_L = label_targets(batch)
    # inplace: backward writes d/dlogits over the logits buffer (nothing reads them later).
    logp_L, _ = vocab_parallel_logprobs(row_logits(logits_BLv), labels_L, tp_group=ctx.tp_group, inplace=True)
    seq_S = sequence_sums(logp_L * mask_L, batch["cu_seqlens"])
    if CP_INDEX in batch:  # this rank's tokens of each sequence -> whole-sequence sums
        seq_S = sum_over_cp(seq_S, ctx.cp_group)
    terms = mpo_pair_losses(seq_S[batch["pair_chosen"]], seq_S[batch["pair_rejected"]], batch["ref_chosen"],
                            batch["ref_rejected"], batch["chosen_lengths"], cfg, delta, mean_chosen_length)
    margin = terms.reward_chosen - terms.reward_rejected
    sums.append([float(terms.loss.detach().sum()), float(terms.preference.detach().sum()),
                 float(terms.quality.detach().sum()), float(terms.generation.detach().sum()),
                 float(terms.reward_chosen.sum()), float(terms.reward_rejected.sum()), float(margin.sum()),
                 float((margin > 0).sum()), float(len(margin))])
    loss = terms.loss.sum() * pair_weight
    return loss * scale, {"mpo_loss": loss.detach().clone()}


@dataclass
class MPOStepResult:
    """Means over the step's pairs (all micro-batches, all DP ranks)."""

    loss: float
    preference: float
    quality: float
    generation: float
    reward_chosen: float
    reward_rejected: float
    reward_margin: float
    accuracy: float
    """Share of pairs whose implicit reward prefers the chosen response."""
    pairs: int


def step_mean_chosen_length(microbatches: Sequence[dict], ctx: ParallelContext, num_pairs: int) -> float:
    """The step's chosen tokens over its ``num_pairs`` pairs (all micro-batches, all DP ranks):
    ``nll_normalization=token``'s divisor. Every rank of a DP replica holds the same
    micro-batches, so a sum over the DP group counts each pair once."""
    local = sum(float(mb["chosen_lengths"].sum()) for mb in microbatches)
    total = torch.tensor([local], dtype=torch.float64, device=ctx.device)
    torch.distributed.all_reduce(total, group=ctx.dp_group)
    return float(total.item()) / num_pairs


def step_reward_sums(model, microbatches: Sequence[dict], ctx: ParallelContext, beta: float) -> tuple[float, int]:
    """(Sum, count) of the step's implicit rewards r = beta (log pi - log pi_ref), chosen and
    rejected, over all micro-batches and DP ranks, under the policy as it is now (a
    forward-only pass; collective). ``bco_delta=trl_running_mean`` folds them into delta
    before the step's loss, as TRL <= 0.28 does with its batch."""
    logprobs = compute_logprobs(model, microbatches, ctx)  # last stage only; [] elsewhere
    total, count = 0.0, 0
    # TP ranks, and CP ranks (gathered rows), hold the same values: count one of them.
    if ctx.is_last_stage and ctx.tp_rank == 0 and ctx.cp_rank == 0:
        for mb, (logp_L, _) in zip(microbatches, logprobs):
            seq_S = sequence_sums(logp_L.double(), mb["cu_seqlens"])
            r_c = implicit_rewards(seq_S[mb["pair_chosen"]], mb["ref_chosen"].double(), beta)
            r_r = implicit_rewards(seq_S[mb["pair_rejected"]], mb["ref_rejected"].double(), beta)
            total += float(r_c.sum() + r_r.sum())
            count += 2 * len(r_c)
    t = sum_over_step([total, float(count)], ctx, over_tp=True)
    return float(t[0]), int(t[1])


def mpo_forward_backward(model, microbatches: list[dict], ctx: ParallelContext, cfg: MPOLossConfig, delta: float,
                         num_pairs: int) -> MPOStepResult:
    """Forward and backward of every micro-batch (``num_pairs``: pairs of the step over all
    DP ranks); gradients are left in the DDP buffers."""
    sums: list = []
    scale = float(len(microbatches) * ctx.dp)
    mean_length = step_mean_chosen_length(microbatches, ctx, num_pairs) if cfg.nll_normalization == "token" else None
    run_schedule(model, microbatches, ctx,
                 partial(_mpo_loss_func, cfg, delta, 1.0 / num_pairs, ctx, scale, sums, mean_chosen_length=mean_length),
                 forward_only=False)
    totals = torch.zeros(len(_SUMS), dtype=torch.float64)
    # TP ranks, and CP ranks (whole pair losses), compute the same sums: count one of them.
    if ctx.is_last_stage and ctx.tp_rank == 0 and ctx.cp_rank == 0 and sums:
        totals = torch.tensor(sums, dtype=torch.float64).sum(0)
    t = dict(zip(_SUMS, sum_over_step(totals, ctx, over_tp=True).tolist()))
    n = max(t["pairs"], 1.0)
    return MPOStepResult(t["loss"] / n, t["preference"] / n, t["quality"] / n, t["generation"] / n,
                         t["reward_chosen"] / n, t["reward_rejected"] / n, t["margin"] / n, t["correct"] / n,
                         int(t["pairs"]))
