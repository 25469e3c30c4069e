"""Token log-probs (and entropy) from vocab-parallel logits without an fp32 [T, V] buffer.

With x = logits / temperature split over TP ranks by vocabulary, each rank computes in
one pass, per row, its slice's maximum c_r, S_r = sum exp(x - c_r), the target logit (0
when another rank holds the label) and, for the entropy, E_r[x - c_r]. Across ranks:

    c = max_r c_r                          (all-reduce MAX)
    w_r = S_r exp(c_r - c)                 (one all-reduce SUM of [w_r, target_r, w_r E_r[x - c]])
    logp = (target - c) - log sum_r w_r,   H = log sum_r w_r - sum_r w_r E_r[x - c] / sum_r w_r

(lse = c + log sum w is never formed: near |x| ~ 1e4 it would round away the answer.)
Backward recomputes p_j = exp((x_j - c) - log sum w) tile by tile from fp32 [T] vectors:
d logp / dx_j = [j = label] - p_j and dH / dx_j = -p_j (x_j - E_p[x]) (times 1/temperature
for logits), optionally written over the logits buffer (``inplace=True``). This is the
vocab-parallel cross-entropy of Megatron-LM (Shoeybi et al., 2019) extended with entropy
and temperature; the online max/sum-exp is Milakov & Gimelshein (2018).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .dispatch import backend_module, resolve_backend
from .stats import RowStats, finite_shift

LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def tp_size_rank(tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def check_logits_labels(logits_TV: torch.Tensor, labels_T: torch.Tensor, tp_size: int, temperature: float) -> None:
    """User errors on the shared inputs, each naming the argument."""
    if logits_TV.dim() != 2:
        raise ValueError(f"logits must be [T, V/tp], got shape {tuple(logits_TV.shape)}")
    if logits_TV.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits dtype must be one of {LOGIT_DTYPES}, got {logits_TV.dtype}")
    if labels_T.shape != logits_TV.shape[:1]:
        raise ValueError(f"labels must be [T] = [{logits_TV.shape[0]}], got {tuple(labels_T.shape)}")
    if labels_T.dtype.is_floating_point or labels_T.dtype == torch.bool:
        raise ValueError(f"labels must be integer vocabulary ids, got {labels_T.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = logits_TV.shape[1] * tp_size
    bad_T = (labels_T < 0) | (labels_T >= vocab)
    if labels_T.numel() and bool(bad_T.any()):
        first = int(bad_T.nonzero()[0, 0])
        raise ValueError(
            f"labels[{first}] = {int(labels_T[first])} is outside the vocabulary [0, {vocab}) "
            f"(V/tp = {logits_TV.shape[1]}, tp = {tp_size}); mask such tokens with a valid id"
        )


def rowwise_input(logits_TV: torch.Tensor) -> torch.Tensor:
    """Kernels need unit stride along the vocabulary; rows may be strided."""
    return logits_TV if logits_TV.stride(1) == 1 else logits_TV.contiguous()


def combine_over_tp(stats: RowStats, tp_group: dist.ProcessGroup) -> RowStats:
    """Whole-vocabulary row statistics from every rank's slice statistics (module docstring)."""
    max_T = stats.row_max.clone()
    dist.all_reduce(max_T, op=dist.ReduceOp.MAX, group=tp_group)
    shift_T = finite_shift(max_T)
    # w_r = sum_j exp(x_j - c) over rank r's slice; 0 for a slice that is -inf throughout.
    weight_T = torch.exp(stats.log_sumexp + (stats.row_max - shift_T))
    parts = [weight_T, stats.target]
    if stats.centered_mean is not None:
        # E_r[x] - c = (E_r[x] - c_r) + (c_r - c); a weightless slice's mean is nan.
        moved_T = stats.centered_mean + (finite_shift(stats.row_max) - shift_T)
        parts.append(torch.where(weight_T > 0, weight_T * moved_T, torch.zeros_like(weight_T)))
    packed = torch.stack(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
    centered_mean_T = packed[2] / packed[0] if stats.centered_mean is not None else None
    return RowStats(max_T, torch.log(packed[0]), packed[1], centered_mean_T)


def grad_buffer(logits_TV: torch.Tensor, inplace: bool) -> torch.Tensor:
    return logits_TV if inplace else torch.empty_like(logits_TV)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TV, labels_T, tp_group, inv_temp, want_entropy, backend, inplace):
        impl = backend_module(backend)
        tp, tp_rank = tp_size_rank(tp_group)
        vocab_start = tp_rank * logits_TV.shape[1]
        stats = impl.row_stats(logits_TV, labels_T, vocab_start, inv_temp, want_entropy)
        if tp > 1:
            stats = combine_over_tp(stats, tp_group)
        logp_T = stats.logprobs()
        entropy_T = stats.entropy() if want_entropy else logp_T.new_empty(0)
        centered_mean_T = stats.centered_mean if want_entropy else logp_T.new_empty(0)
        ctx.save_for_backward(logits_TV, labels_T, finite_shift(stats.row_max), stats.log_sumexp, centered_mean_T)
        ctx.impl, ctx.vocab_start, ctx.inv_temp, ctx.inplace = impl, vocab_start, inv_temp, inplace
        ctx.want_entropy = want_entropy
        return logp_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logp_T, grad_entropy_T):
        logits_TV, labels_T, shift_T, log_sumexp_T, centered_mean_T = ctx.saved_tensors
        if grad_logp_T is None:
            grad_logp_T = torch.zeros_like(shift_T)
        use_entropy = ctx.want_entropy and grad_entropy_T is not None
        out_TV = grad_buffer(logits_TV, ctx.inplace)
        ctx.impl.logits_grad(
            logits_TV, labels_T, ctx.vocab_start, ctx.inv_temp, shift_T, log_sumexp_T,
            grad_logp_T.to(torch.float32).contiguous(),
            centered_mean_T if use_entropy else None,
            grad_entropy_T.to(torch.float32).contiguous() if use_entropy else None,
            out_TV,
        )
        return out_TV, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    inplace: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of each row's label and optionally the entropy, under ``softmax(logits / temperature)``.

    Args:
        logits: this rank's vocabulary slice ``[T, V/tp]`` (bf16, fp16 or fp32); rank r of
            ``tp_group`` holds vocabulary ids ``[r V/tp, (r+1) V/tp)`` as in Megatron's
            vocab-parallel output layer.
        labels: global vocabulary ids ``[T]``.
        tp_group: the tensor-parallel group the vocabulary is split over (None: whole vocab here).
        return_entropy: also return the entropy of each row's distribution.
        backend: ``auto``, ``triton``, ``interpret`` or ``torch`` (see ``dispatch``).
        inplace: backward writes d/dlogits over ``logits``; the caller must not use
            ``logits`` after backward (saves one ``[T, V/tp]`` buffer).

    Returns:
        ``(logprobs [T] fp32, entropy [T] fp32 or None)``, both differentiable.
    """
    tp, _ = tp_size_rank(tp_group)
    check_logits_labels(logits, labels, tp, temperature)
    impl_name = resolve_backend(backend, logits.device)
    logits_TV = rowwise_input(logits)
    labels_T = labels.to(torch.int64).contiguous()
    logp_T, entropy_T = _VocabParallelLogprobs.apply(
        logits_TV, labels_T, tp_group, 1.0 / temperature, return_entropy, impl_name, inplace
    )
    return logp_T, (entropy_T if return_entropy else None)
