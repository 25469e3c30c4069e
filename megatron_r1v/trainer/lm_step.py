"""Language-model forward/backward through Megatron-Core's pipeline schedules.

One call runs all micro-batches of a step on this rank with the schedule Megatron
picks for the PP size (no pipelining, or 1F1B), computes the token-mean
cross-entropy on the last stage with ``vocab_parallel_cross_entropy`` (the model has
already masked vocab-padding logits), and leaves gradients in the DDP buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_r1v.models.r1v.model import causal_attention_mask
from megatron_r1v.platform import ParallelContext


def make_lm_microbatch(
    tokens_BS: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS: Optional[torch.Tensor] = None
) -> dict[str, torch.Tensor]:
    """A causal-LM micro-batch in the layout :func:`lm_forward_backward` consumes."""
    batch, seq = tokens_BS.shape
    return {
        "tokens": tokens_BS,
        "labels": labels_BS,
        "loss_mask": torch.ones_like(tokens_BS, dtype=torch.float32) if loss_mask_BS is None else loss_mask_BS.float(),
        "position_ids": torch.arange(seq, device=tokens_BS.device).expand(batch, seq),
        "attention_mask": causal_attention_mask(seq, tokens_BS.device),
    }


@dataclass
class LMStepResult:
    loss: Optional[float]
    """Mean of the micro-batch losses over all data-parallel ranks (every rank receives it)."""
    logits: list[torch.Tensor] = field(default_factory=list)
    """Per micro-batch vocab-parallel logits [B, S, V_pad/tp] (last stage, keep_logits)."""


def _lm_loss(batch: dict, keep: Optional[list], logits_BSv: torch.Tensor):
    if keep is not None:
        # A copy: Megatron's vocab-parallel CE works in place on its input, which shares
        # storage with the logits whenever transpose().contiguous() is a no-op (B == 1).
        keep.append(logits_BSv.detach().clone())
    # Megatron's vocab-parallel CE takes sequence-first [S, B, V/tp] logits.
    token_loss_SB = tensor_parallel.vocab_parallel_cross_entropy(
        logits_BSv.transpose(0, 1).float().contiguous(), batch["labels"].transpose(0, 1).contiguous()
    )
    mask_SB = batch["loss_mask"].transpose(0, 1)
    loss = (token_loss_SB * mask_SB).sum() / mask_SB.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the micro-batch count.
    return loss, {"lm_loss": loss.detach().clone()}


def lm_forward_backward(
    model: torch.nn.Module,
    microbatches: list[dict[str, torch.Tensor]],
    ctx: ParallelContext,
    *,
    forward_only: bool = False,
    keep_logits: bool = False,
) -> LMStepResult:
    """Runs every micro-batch forward (and backward); returns the mean loss."""
    assert microbatches, "no micro-batches"
    batch0 = microbatches[0]["tokens"]
    keep: Optional[list] = [] if keep_logits else None

    def forward_step(data_iterator: Iterator[dict], stage_model: torch.nn.Module):
        batch = {k: v.to(ctx.device) for k, v in next(data_iterator).items()}
        output = stage_model(
            batch["tokens"], batch["position_ids"], batch["attention_mask"], pixel_values=batch.get("pixel_values")
        )
        return output, partial(_lm_loss, batch, keep)

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=batch0.shape[1],
        micro_batch_size=batch0.shape[0],
        forward_only=forward_only,
    )
    total = torch.zeros(2, dtype=torch.float64)
    if ctx.is_last_stage:
        total[0] = sum(float(item["lm_loss"]) for item in losses)
        total[1] = len(losses)
    # Only the last stage computed the loss; share it along the pipeline, then
    # average over data-parallel replicas, which saw different micro-batches.
    total = total.to(ctx.device)
    dist.all_reduce(total, group=ctx.pp_group)
    dist.all_reduce(total, group=ctx.dp_group)
    return LMStepResult(loss=float(total[0] / total[1]), logits=keep or [])


def gather_vocab_logits(logits_BSv: torch.Tensor, ctx: ParallelContext, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits ``[B, S, V]`` on the CPU from this rank's vocab slice.

    Collective over the TP group (last pipeline stage); TP padding columns are dropped.
    For checks and tests: training never materializes the full vocabulary.
    """
    parts = [torch.empty_like(logits_BSv) for _ in range(ctx.tp)]
    dist.all_gather(parts, logits_BSv.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)[..., :vocab_size].cpu()


def attach_ddp_hooks(ddp_model: torch.nn.Module, optimizer: Optional[MegatronOptimizer] = None) -> None:
    """Lets the schedule drive DDP: no grad sync inside micro-batches, finalize after."""
    config = ddp_model.config
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if optimizer is not None:
        config.grad_scale_func = optimizer.scale_loss


def lm_train_step(
    ddp_model: torch.nn.Module,
    optimizer: MegatronOptimizer,
    microbatches: list[dict[str, torch.Tensor]],
    ctx: ParallelContext,
) -> tuple[float, Optional[float]]:
    """One optimizer step over ``microbatches``; returns (mean loss, grad norm)."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    result = lm_forward_backward(ddp_model, microbatches, ctx)
    update_ok, grad_norm, _ = optimizer.step()
    if not update_ok:
        raise FloatingPointError("optimizer step skipped: non-finite gradients")
    return result.loss, grad_norm
