"""What every training step shares: micro-batches through Megatron-Core's pipeline
schedules, the reductions of per-step sums, and the optimizer step.

- :func:`run_schedule` runs micro-batch dicts (``tokens``, ``position_ids``, for packed
  rows ``cu_seqlens`` (the model gets them as :func:`packed_seq_params`, THD; without them
  attention is causal over each batch row), optional ``pixel_values``, plus whatever the
  loss reads) through the
  schedule Megatron picks for the PP size (no pipelining, or 1F1B); ``loss_func(batch,
  logits)`` runs on the last stage, with logits the vocab-parallel ``[B, S, V/tp]`` of
  this rank. :func:`packed_batch` / :func:`causal_lm_microbatch` build those dicts from
  packed rows / plain token batches, :func:`label_targets` the kernel's targets.
- :func:`compute_logprobs` (token log-probs, optionally entropy) and
  :func:`forward_logits` are forward-only passes built on it.
- :func:`sum_over_step` reduces a vector of per-rank sums to the step's totals: first
  along the pipeline (only the last stage computed them), then over data-parallel
  replicas (which saw different micro-batches) and over CP ranks (each summed its own
  tokens of every row), optionally over TP (where the TP ranks contributed one copy
  between them).
- Context parallelism (``parallel.cp`` > 1): :func:`run_schedule` splits every packed row
  over the CP ranks (:func:`split_for_cp`, ``models.r1v.context_parallel``); the loss
  functions see this rank's tokens (``[1, L_padded / cp]`` per-token fields, ``cu_seqlens``
  of the local row), :func:`compute_logprobs` and :func:`forward_logits` gather the rows back.
- :func:`optimizer_step` zeroes the gradients, runs a forward/backward, steps the
  optimizer, and refuses non-finite gradients (:func:`gradients_finite`) or a skipped
  update, leaving the weights untouched.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_r1v.data.packing import PackedMicroBatch
from megatron_r1v.data.template import IGNORE_INDEX
from megatron_r1v.kernels import vocab_parallel_logprobs
from megatron_r1v.models.r1v import context_parallel as cpx
from megatron_r1v.platform import ParallelContext

Result = TypeVar("Result")


def packed_batch(packed: PackedMicroBatch) -> dict[str, torch.Tensor]:
    """The tensors every schedule step needs from a packed row (the model's inputs and targets)."""
    batch = {
        "tokens": packed.input_ids,
        "labels": packed.labels,
        "loss_mask": packed.loss_mask,
        "position_ids": packed.position_ids,
        "cu_seqlens": packed.cu_seqlens,
    }
    if packed.pixel_values is not None:
        batch["pixel_values"] = packed.pixel_values
    return batch


def causal_lm_microbatch(tokens_BS: torch.Tensor, labels_BS: Optional[torch.Tensor] = None,
                         loss_mask_BS: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """A micro-batch of plain (unpacked) sequences ``[B, S]``, each attended causally; labels
    default to the tokens, the loss mask to all ones."""
    batch, seq = tokens_BS.shape
    return {
        "tokens": tokens_BS,
        "labels": tokens_BS if labels_BS is None else labels_BS,
        "loss_mask": torch.ones_like(tokens_BS, dtype=torch.float32) if loss_mask_BS is None else loss_mask_BS.float(),
        "position_ids": torch.arange(seq, device=tokens_BS.device).expand(batch, seq),
    }


def packed_seq_params(cu_seqlens: Optional[torch.Tensor], device: torch.device,
                      cu_seqlens_padded: Optional[torch.Tensor] = None) -> Optional[PackedSeqParams]:
    """Megatron's THD description of a packed row ``[1, L]`` from its segment bounds
    (``None`` for unpacked batches). ``cu_seqlens`` is read on the host: the max length
    must be a Python int, and taking it from a GPU tensor would synchronize.

    ``cu_seqlens_padded``: with context parallelism, the global bounds of the padded layout
    (``cu_seqlens`` then holds the global real lengths): TE's THD attention takes both, and
    Megatron's RoPE reads the padded ones; the max length is the longest padded segment."""
    if cu_seqlens is None:
        return None
    if cu_seqlens_padded is not None:
        max_padded = int((cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).max())
        cu, cu_padded = (c.to(device=device, dtype=torch.int32) for c in (cu_seqlens, cu_seqlens_padded))
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                               cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max_padded, max_seqlen_kv=max_padded)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def label_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token ids ``[L]`` of a packed row for the kernels, its loss mask ``[L]``)."""
    labels_L = batch["labels"][0]
    mask_L = batch["loss_mask"][0]
    # Ignored positions need a valid id for the kernel; their loss and gradient are masked.
    return torch.where(labels_L == IGNORE_INDEX, torch.zeros_like(labels_L), labels_L), mask_L


def row_logits(logits_BLv: torch.Tensor) -> torch.Tensor:
    """The ``[L, V/tp]`` logits of a packed row (B = 1) as a view of the model's output, so
    an in-place loss backward writes its gradient straight into that buffer (indexing
    ``[0]`` would make autograd allocate a zero-filled ``[1, L, V/tp]`` gradient for it)."""
    if logits_BLv.shape[0] == 1 and logits_BLv.is_contiguous():
        return logits_BLv.view(logits_BLv.shape[1], logits_BLv.shape[2])
    return logits_BLv[0]


def split_for_cp(model, microbatches: Sequence[dict], ctx: ParallelContext) -> tuple[list[dict], list]:
    """This CP rank's micro-batch dicts and each row's :class:`~cpx.CPLayout` (module doc).

    Segments are padded to ``2 * cp`` (times TP under sequence parallelism, read from the
    model's config); with pipeline parallelism every row is padded to the longest padded
    row, as the stages exchange one activation shape."""
    config = getattr(model, "config", None)
    multiple = cpx.cp_token_multiple(ctx.cp, ctx.tp, bool(getattr(config, "sequence_parallel", False)))
    layouts = [cpx.plan_layout(mb["cu_seqlens"], ctx.cp, multiple) if "cu_seqlens" in mb else None
               for mb in microbatches]
    if any(layout is None for layout in layouts):
        raise ValueError("parallel.cp > 1 splits packed rows (cu_seqlens); a micro-batch of unpacked rows "
                         "cannot be split over context-parallel ranks")
    target = max(layout.padded_length for layout in layouts) if ctx.pp > 1 else 0
    split = [cpx.split_microbatch(mb, ctx.cp, ctx.cp_rank, multiple, target) for mb in microbatches]
    return [batch for batch, _ in split], [layout for _, layout in split]


def _model_inputs(batch: dict, host_batch: dict, device: torch.device) -> tuple[tuple, dict]:
    kwargs = {"pixel_values": batch.get("pixel_values")}
    if cpx.CP_INDEX in batch:  # only then: models without the argument run unsplit rows
        kwargs["cp_index"] = batch[cpx.CP_INDEX]
        kwargs["packed_seq_params"] = packed_seq_params(host_batch[cpx.CP_CU_SEQLENS], device,
                                                        host_batch[cpx.CP_CU_SEQLENS_PADDED])
    else:
        kwargs["packed_seq_params"] = packed_seq_params(host_batch.get("cu_seqlens"), device)
    return (batch["tokens"], batch["position_ids"]), kwargs


def run_schedule(model, microbatches: Sequence[dict], ctx: ParallelContext, loss_func: Callable,
                 forward_only: bool) -> list:
    """Runs Megatron's schedule over the micro-batch dicts; ``loss_func(batch, logits)`` is
    called on the last stage and returns ``(loss, {name: tensor})``. With ``parallel.cp`` > 1
    rows not yet split are split here (:func:`split_for_cp`)."""
    if not microbatches:
        raise ValueError("no micro-batches on this rank: every data-parallel rank needs at least one sample")
    if ctx.cp > 1 and not all(cpx.CP_INDEX in mb for mb in microbatches):
        microbatches, _ = split_for_cp(model, microbatches, ctx)

    def forward_step(data_iterator: Iterator[dict], stage_model: torch.nn.Module):
        host_batch = next(data_iterator)
        batch = {k: v.to(ctx.device) for k, v in host_batch.items()}
        args, kwargs = _model_inputs(batch, host_batch, ctx.device)
        return stage_model(*args, **kwargs), partial(loss_func, batch)

    # A 1F1B pipeline sends one activation shape between stages: packed rows must all
    # have the schedule's length (pad them to the token budget).
    lengths = {mb["tokens"].shape[1] for mb in microbatches}
    if ctx.pp > 1 and len(lengths) > 1:
        raise ValueError(f"with pipeline parallelism every micro-batch must have the same length, got {sorted(lengths)}"
                         " (pack with a fixed token budget and pad_to_multiple equal to it)")
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=max(lengths),
        micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=forward_only,
    )


def sum_over_step(values: Sequence[float] | torch.Tensor, ctx: ParallelContext, over_tp: bool = False) -> torch.Tensor:
    """This rank's sums (fp64), summed along the pipeline, then over DP and CP (and TP): the
    step's totals on every rank. CP ranks contribute sums over their own tokens; a value every
    CP rank holds whole must be given by one of them (``ctx.cp_rank == 0``)."""
    totals = torch.as_tensor(values, dtype=torch.float64).to(ctx.device)
    dist.all_reduce(totals, group=ctx.pp_group)
    dist.all_reduce(totals, group=ctx.dp_group)
    if ctx.cp > 1:
        dist.all_reduce(totals, group=ctx.cp_group)
    if over_tp:
        dist.all_reduce(totals, group=ctx.tp_group)
    return totals.cpu()


def optimizer_step(ddp_model, optimizer: MegatronOptimizer, forward_backward: Callable[[], Result],
                   where: str) -> tuple[Result, Optional[float]]:
    """Zeroes the gradients, runs ``forward_backward()`` (which leaves gradients in the DDP
    buffers), steps the optimizer; returns (its result, the gradient norm).

    Non-finite gradients on any rank raise FloatingPointError naming ``where`` on every
    rank, with the weights and the optimizer state untouched: checked here (one all-reduce)
    because Megatron's fp32 optimizer would apply them, and a step the mixed-precision
    optimizer skips for them raises the same."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    result = forward_backward()
    if not gradients_finite(ddp_model):
        raise FloatingPointError(f"{where}: non-finite gradients; the optimizer step was not taken")
    update_ok, grad_norm, _ = optimizer.step()
    if not update_ok:
        raise FloatingPointError(f"{where}: optimizer step skipped (non-finite gradients)")
    return result, grad_norm


def gradients_finite(ddp_model) -> bool:
    """Whether every rank's reduced gradients (``main_grad``) are finite (collective, MIN)."""
    grads = [p.main_grad for p in ddp_model.parameters()
             if p.requires_grad and getattr(p, "main_grad", None) is not None]
    # A stage may hold no trainable parameter (frozen layers) and still takes part.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    finite = torch.ones(1, device=device)
    for grad in grads:
        finite = torch.minimum(finite, torch.isfinite(grad).all().to(finite.dtype))
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def attach_ddp_hooks(ddp_model: torch.nn.Module, optimizer: Optional[MegatronOptimizer] = None) -> None:
    """Lets the schedule drive DDP: no grad sync inside micro-batches, finalize after."""
    config = ddp_model.config
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if optimizer is not None:
        config.grad_scale_func = optimizer.scale_loss


def _zero_loss(output: torch.Tensor) -> tuple[torch.Tensor, dict]:
    zero = output.sum() * 0.0
    return zero, {"unused": zero.detach()}


def _keep_logprobs(temperature: float, ctx: ParallelContext, collected: list, want_entropy: bool, batch: dict,
                   logits_BLv: torch.Tensor):
    labels_L, mask_L = label_targets(batch)
    logp_L, entropy_L = vocab_parallel_logprobs(
        logits_BLv[0], labels_L, tp_group=ctx.tp_group, temperature=temperature, return_entropy=want_entropy)
    collected.append((logp_L.detach() * mask_L, None if entropy_L is None else entropy_L.detach() * mask_L))
    return _zero_loss(logp_L)


def compute_logprobs(model, microbatches: Sequence[dict], ctx: ParallelContext, temperature: float = 1.0,
                     want_entropy: bool = False) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Per-position log-probs ``[L]`` of the labels (0 where masked) for each packed
    micro-batch, and optionally the entropy; on the last pipeline stage (other stages get
    an empty list)."""
    collected: list = []
    layouts: list = []
    if ctx.cp > 1:
        microbatches, layouts = split_for_cp(model, microbatches, ctx)
    with torch.no_grad():
        run_schedule(model, microbatches, ctx, partial(_keep_logprobs, temperature, ctx, collected, want_entropy),
                     forward_only=True)
    if layouts and collected:  # this rank's tokens of each row -> the whole row, on every CP rank
        collected = [tuple(None if t is None else cpx.gather_row(t, layout, ctx.cp_group) for t in pair)
                     for pair, layout in zip(collected, layouts)]
    return [(lp.cpu(), None if h is None else h.cpu()) for lp, h in collected]


def _keep_logits(kept: list, batch: dict, logits_BSv: torch.Tensor):
    kept.append(logits_BSv.detach().clone())
    return _zero_loss(logits_BSv)


def forward_logits(model, microbatches: Sequence[dict], ctx: ParallelContext) -> list[torch.Tensor]:
    """This rank's vocab-parallel logits ``[B, S, V_pad/tp]`` of each micro-batch (last
    pipeline stage; other stages get an empty list), whole rows under context parallelism.
    For checks: training never keeps them."""
    kept: list = []
    layouts: list = []
    if ctx.cp > 1:
        microbatches, layouts = split_for_cp(model, microbatches, ctx)
    with torch.no_grad():
        run_schedule(model, microbatches, ctx, partial(_keep_logits, kept), forward_only=True)
    if layouts and kept:
        kept = [cpx.gather_row(logits[0], layout, ctx.cp_group)[None] for logits, layout in zip(kept, layouts)]
    return kept


def gather_vocab_logits(logits_BSv: torch.Tensor, ctx: ParallelContext, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits ``[B, S, V]`` on the CPU from this rank's vocab slice.

    Collective over the TP group (last pipeline stage); TP padding columns are dropped.
    For checks and tests: training never materializes the full vocabulary.
    """
    parts = [torch.empty_like(logits_BSv) for _ in range(ctx.tp)]
    dist.all_gather(parts, logits_BSv.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)[..., :vocab_size].cpu()
