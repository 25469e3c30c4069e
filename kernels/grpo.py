"""Fused clipped-ratio GRPO loss on vocab-parallel logits.

Per token t with logp_t from :mod:`vocab_parallel` (same one-pass statistics, same TP
reduction), Eq. 8 of the Skywork R1V2 report (the PPO clipped surrogate of Schulman et
al., 2017, with group-relative advantages as in DeepSeekMath, Shao et al., 2024) plus a
k3 KL penalty (Schulman, "Approximating KL divergence", 2020):

    r_t    = exp(b(logp_t - old_logp_t))
    loss_t = m_t [ max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high)) + beta k3_t ]
    k3_t   = exp(b(ref_t - logp_t)) - b(ref_t - logp_t) - 1

b clamps a log-ratio to +-20 (``stats.LOG_RATIO_BOUND``: fp32 exp overflows above 88.7;
verl clamps at the same bound), and the k3 term is left out when beta is 0, so finite
logits give a finite loss and gradient whatever the behaviour and reference log-probs.
The per-token derivative dloss_t / dlogp_t = m_t [ -A_t r_t (0 when clipped) +
beta (1 - exp(b(ref_t - logp_t))) ], each part 0 where its log-ratio lies outside the
bound (torch.clamp's gradient), is computed in the forward and saved as one fp32 [T]
vector, so backward is a single pass over the logits: dlogits = g_t dloss_t/dlogp_t
([j = label] - p_j) / temperature. Sequence and group averaging (Eq. 8's 1/|o_i| and
1/G) are the caller's reduction over ``loss_per_token``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .dispatch import backend_module, resolve_backend
from .stats import GRPOInputs, finite_shift
from .vocab_parallel import check_logits_labels, combine_over_tp, grad_buffer, rowwise_input, tp_size_rank


class GRPOStats(NamedTuple):
    """Per-token diagnostics (no gradient): ``logprobs``, ``ratio``, ``clipped`` (bool) and
    ``kl`` (k3; None when no reference log-probs were given)."""

    logprobs: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    kl: Optional[torch.Tensor]


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TV, labels_T, inputs, tp_group, inv_temp, backend, inplace):
        impl = backend_module(backend)
        tp, tp_rank = tp_size_rank(tp_group)
        vocab_start = tp_rank * logits_TV.shape[1]
        if tp == 1:
            shift_T, log_sumexp_T, logp_T, terms = impl.row_stats_grpo(logits_TV, labels_T, inv_temp, inputs)
        else:
            stats = combine_over_tp(impl.row_stats(logits_TV, labels_T, vocab_start, inv_temp, False), tp_group)
            shift_T, log_sumexp_T, logp_T = finite_shift(stats.row_max), stats.log_sumexp, stats.logprobs()
            terms = impl.grpo_token_terms(logp_T, inputs)
        kl_T = terms.kl if terms.kl is not None else logp_T.new_empty(0)
        ctx.save_for_backward(logits_TV, labels_T, shift_T, log_sumexp_T, terms.dloss_dlogp)
        ctx.impl, ctx.vocab_start, ctx.inv_temp, ctx.inplace = impl, vocab_start, inv_temp, inplace
        ctx.mark_non_differentiable(logp_T, terms.ratio, terms.clipped, kl_T)
        return terms.loss, logp_T, terms.ratio, terms.clipped, kl_T

    @staticmethod
    def backward(ctx, grad_loss_T, *_unused):
        logits_TV, labels_T, shift_T, log_sumexp_T, dloss_dlogp_T = ctx.saved_tensors
        out_TV = grad_buffer(logits_TV, ctx.inplace)
        coef_T = (grad_loss_T.to(torch.float32) * dloss_dlogp_T).contiguous()
        ctx.impl.logits_grad(
            logits_TV, labels_T, ctx.vocab_start, ctx.inv_temp, shift_T, log_sumexp_T, coef_T, None, None, out_TV
        )
        return out_TV, None, None, None, None, None, None


def _token_vector(name: str, value: torch.Tensor, n_tokens: int, device: torch.device) -> torch.Tensor:
    if value.shape != (n_tokens,):
        raise ValueError(f"{name} must be [T] = [{n_tokens}], got {tuple(value.shape)}")
    return value.detach().to(device=device, dtype=torch.float32).contiguous()


def grpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_beta: float = 0.0,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    backend: str = "auto",
    inplace: bool = False,
) -> tuple[torch.Tensor, GRPOStats]:
    """Per-token clipped GRPO loss (module docstring) from this rank's vocab slice.

    Args:
        logits: ``[T, V/tp]`` bf16/fp16/fp32, this rank's vocabulary slice.
        labels: global vocabulary ids ``[T]``.
        old_logprobs: behaviour-policy log-probs ``[T]``.
        ref_logprobs: reference-policy log-probs ``[T]``; may be None when ``kl_beta`` is 0.
        advantages: per-token advantages ``[T]`` (the caller broadcasts per sequence).
        loss_mask: ``[T]`` bool or float weights; masked tokens get loss 0 and no gradient.
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        kl_beta: weight of the k3 KL penalty.
        inplace: backward writes d/dlogits over ``logits`` (see ``vocab_parallel_logprobs``).

    Returns:
        ``(loss_per_token [T] fp32, GRPOStats)``; only the loss carries a gradient.
    """
    tp, _ = tp_size_rank(tp_group)
    check_logits_labels(logits, labels, tp, temperature)
    if ref_logprobs is None and kl_beta != 0.0:
        raise ValueError(f"kl_beta = {kl_beta} needs ref_logprobs")
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    impl_name = resolve_backend(backend, logits.device)
    n_tokens, dev = logits.shape[0], logits.device
    inputs = GRPOInputs(
        old_logp=_token_vector("old_logprobs", old_logprobs, n_tokens, dev),
        ref_logp=_token_vector("ref_logprobs", ref_logprobs, n_tokens, dev) if ref_logprobs is not None else None,
        advantages=_token_vector("advantages", advantages, n_tokens, dev),
        mask=_token_vector("loss_mask", loss_mask, n_tokens, dev),
        clip_low=clip_low, clip_high=clip_high, kl_beta=kl_beta,
    )
    loss_T, logp_T, ratio_T, clipped_T, kl_T = _GRPOLoss.apply(
        rowwise_input(logits), labels.to(torch.int64).contiguous(), inputs, tp_group, 1.0 / temperature, impl_name,
        inplace,
    )
    return loss_T, GRPOStats(logp_T, ratio_T, clipped_T, kl_T if ref_logprobs is not None else None)
