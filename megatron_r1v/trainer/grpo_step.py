"""GRPO forward/backward and token log-probs through Megatron-Core's pipeline schedules.

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
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_r1v.data.packing import PackedMicroBatch
from megatron_r1v.data.template import IGNORE_INDEX
from megatron_r1v.kernels import vocab_parallel_logprobs
from megatron_r1v.losses.grpo import GRPOLossConfig, grpo_policy_loss
from megatron_r1v.platform import ParallelContext


def packed_batch(packed: PackedMicroBatch) -> dict[str, torch.Tensor]:
    """The tensors every schedule step needs from a packed row (the model's inputs and targets)."""
    batch = {
        "tokens": packed.input_ids,
        "labels": packed.labels,
        "loss_mask": packed.loss_mask,
        "position_ids": packed.position_ids,
        "attention_mask": packed.attention_mask(),
    }
    if packed.pixel_values is not None:
        batch["pixel_values"] = packed.pixel_values
    return batch


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


def label_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    labels_L = batch["labels"][0]
    mask_L = batch["loss_mask"][0]
    # Ignored positions need a valid id for the kernel; their loss and gradient are masked.
    return torch.where(labels_L == IGNORE_INDEX, torch.zeros_like(labels_L), labels_L), mask_L


def _grpo_loss_func(cfg: GRPOLossConfig, ctx: ParallelContext, scale: float, metrics: list, batch: dict,
                    logits_BLv: torch.Tensor):
    labels_L, mask_L = label_targets(batch)
    out = grpo_policy_loss(
        logits_BLv[0], labels_L, batch["old_logprobs"][0], batch["ref_logprobs"][0], batch["advantages"][0],
        mask_L, batch["weights"][0], cfg, tp_group=ctx.tp_group,
    )
    metrics.append({"loss": float(out.loss.detach()), "kl": out.kl_mean, "clip_fraction": out.clip_fraction,
                    "tokens": float(mask_L.sum())})
    return out.loss * scale, {"grpo_loss": out.loss.detach().clone()}


def _logprob_func(temperature: float, ctx: ParallelContext, collected: list, want_entropy: bool, batch: dict,
                  logits_BLv: torch.Tensor):
    labels_L, mask_L = label_targets(batch)
    logp_L, entropy_L = vocab_parallel_logprobs(
        logits_BLv[0], labels_L, tp_group=ctx.tp_group, temperature=temperature, return_entropy=want_entropy)
    collected.append((logp_L.detach() * mask_L, None if entropy_L is None else entropy_L.detach() * mask_L))
    zero = logp_L.sum() * 0.0
    return zero, {"unused": zero.detach()}


def run_schedule(model, microbatches, ctx: ParallelContext, loss_func, forward_only: bool) -> list:
    """Runs Megatron's schedule over packed micro-batch dicts; ``loss_func(batch, logits)``
    is called on the last stage."""
    if not microbatches:
        raise ValueError("no micro-batches on this rank: every data-parallel rank needs at least one sample")

    def forward_step(data_iterator: Iterator[dict], stage_model: torch.nn.Module):
        batch = {k: v.to(ctx.device) for k, v in next(data_iterator).items()}
        output = stage_model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                             pixel_values=batch.get("pixel_values"))
        return output, partial(loss_func, batch)

    # Packed rows differ in length: one micro-batch at a time through a 1F1B pipeline
    # needs a fixed shape, so the schedule gets the longest (rows are padded to it).
    lengths = {mb["tokens"].shape[1] for mb in microbatches}
    if ctx.pp > 1 and len(lengths) > 1:
        raise ValueError(f"with pipeline parallelism every micro-batch must have the same length, got {sorted(lengths)}"
                         " (pack with a fixed token budget and pad_to_multiple equal to it)")
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=max(lengths), micro_batch_size=1, forward_only=forward_only,
    )


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
    totals = torch.zeros(4, dtype=torch.float64)
    if ctx.is_last_stage:
        tokens = sum(m["tokens"] for m in metrics)
        totals[0] = sum(m["loss"] for m in metrics)
        totals[1] = sum((m["kl"] or 0.0) * m["tokens"] for m in metrics)
        totals[2] = sum(m["clip_fraction"] * m["tokens"] for m in metrics)
        totals[3] = tokens
    # The loss lives on the last stage; share it along the pipeline, then sum over DP
    # (each rank's weights already carry the global normalization).
    totals = totals.to(ctx.device)
    dist.all_reduce(totals, group=ctx.pp_group)
    dist.all_reduce(totals, group=ctx.dp_group)
    n_tokens = max(float(totals[3]), 1.0)
    return GRPOStepResult(float(totals[0]), float(totals[1]) / n_tokens if cfg.kl_beta else None,
                          float(totals[2]) / n_tokens, metrics)


def compute_logprobs(model, microbatches: list[dict], ctx: ParallelContext, temperature: float = 1.0,
                     want_entropy: bool = False) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Per-position log-probs of the labels (0 where masked) for each micro-batch, and
    optionally the entropy; on the last pipeline stage (other stages get an empty list)."""
    collected: list = []
    with torch.no_grad():
        run_schedule(model, microbatches, ctx,
                      partial(_logprob_func, temperature, ctx, collected, want_entropy),
                      forward_only=True)
    return [(lp.cpu(), None if h is None else h.cpu()) for lp, h in collected]
