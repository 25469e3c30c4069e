"""GRPO loss variants (``grpo.kl_estimator``, ``grpo.clip_ratio_c``, ``grpo.importance_level``).

The default objective (Eq. 8 of the R1V2 report with the k3 KL term, token-level ratios,
no dual clip) runs in the fused kernel :func:`megatron_r1v.kernels.grpo_loss`. The kernel
cannot express the variants below, so a config that selects any of them takes the
per-token log-probs from the fused, differentiable
:func:`megatron_r1v.kernels.vocab_parallel_logprobs` (same vocab-parallel statistics, same
TP reduction, no fp32 ``[T, V]`` buffer) and builds the loss from those ``[T]`` vectors in
plain torch; autograd carries the gradient back into the kernel's backward. With every
switch at its default the fused path runs, bit for bit today's numbers.

Per token t of response i, with m_t the loss mask and log-ratios taken only where m_t != 0:

- Importance ratio (``importance_level``):
  ``token``    r_t = exp(logp_t - old_t), as in PPO / GRPO (Eq. 8);
  ``sequence`` GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", Eq. 7):
               s_i = exp(1/|o_i| sum_t (logp_t - old_t)), the length-normalized
               sequence likelihood ratio, shared by (and clipped once for) all tokens of
               response i; the gradient reaches every token through the mean.
  Either log-ratio is clamped to +-``LOG_RATIO_BOUND`` (20) before exp, as in the kernel.
- Clipped surrogate: l_t = max(-A r, -A clip(r, 1 - e_low, 1 + e_high)); with the dual clip
  (``clip_ratio_c`` = c > 1; Ye et al. 2020, "Mastering Complex Control in MOBA Games with
  Deep RL", Eq. 5; verl's ``clip_ratio_c``) a token with A < 0 has its loss capped at -A c,
  so a ratio far above 1 (a stale SSB group whose old log-probs are an older policy's)
  cannot push a negative-advantage token's loss, or its gradient, without bound.
- KL to the reference (``kl_estimator``, Schulman 2020, "Approximating KL divergence"),
  with x_t = ref_t - logp_t = log(pi_ref / pi):
  ``k1`` -x (unbiased, high variance, may be negative per token),
  ``k2`` x^2 / 2 (biased, low variance),
  ``k3`` exp(x) - x - 1 (unbiased, low variance, >= 0; the report's and the kernel's).
  The clamp: x is clamped to +-``LOG_RATIO_BOUND`` before any estimator (torch.clamp:
  outside the bound the term is constant and has no gradient), the kernel's k3 bound
  applied to all three, so switching estimators changes nothing else; fp32 exp(20) = 4.9e8.

loss_t = m_t (l_t + beta kl_t); the caller's per-token weights make sum_t w_t loss_t the
step mean (``losses.grpo.token_weights``).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_r1v.kernels.stats import LOG_RATIO_BOUND

KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")


def kl_estimate(ref_logp_T: torch.Tensor, logp_T: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (module docstring:
    k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1 with x = clamp(ref - logp, +-20); Schulman 2020)."""
    x_T = (ref_logp_T - logp_T).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if estimator == "k1":
        return -x_T
    if estimator == "k2":
        return 0.5 * x_T * x_T
    if estimator == "k3":
        return torch.exp(x_T) - x_T - 1.0
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def sequence_log_ratio(log_ratio_T: torch.Tensor, mask_T: torch.Tensor, segment_T: torch.Tensor) -> torch.Tensor:
    """GSPO's log s_i = 1/|o_i| sum_t m_t log_ratio_t (Zheng et al. 2025, Eq. 7), put back on
    every position of sequence i; ``segment_T`` [T] int64 numbers the packed sequences. A
    sequence without loss tokens gets 0. Differentiable in ``log_ratio_T``."""
    if segment_T.shape != log_ratio_T.shape:
        raise ValueError(f"segment_ids must be [T] = [{log_ratio_T.shape[0]}], got {tuple(segment_T.shape)}")
    n_seg = int(segment_T.max()) + 1 if segment_T.numel() else 0
    mask_f_T = mask_T.to(log_ratio_T.dtype)
    total_S = torch.zeros(n_seg, dtype=log_ratio_T.dtype, device=log_ratio_T.device)
    total_S = total_S.index_add(0, segment_T, log_ratio_T * mask_f_T)
    count_S = torch.zeros_like(total_S).index_add(0, segment_T, mask_f_T)
    return (total_S / count_S.clamp(min=1.0))[segment_T]


def clipped_surrogate(log_ratio_T: torch.Tensor, adv_T: torch.Tensor, clip_low: float, clip_high: float,
                      clip_ratio_c: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_T, ratio_T, clipped_T) of the clipped surrogate with the optional dual clip
    (module docstring; PPO's Eq. 7, Schulman et al. 2017; dual clip: Ye et al. 2020, Eq. 5).

    Where a clip is active the loss is a constant (no gradient), exactly as the kernel's
    strict comparison: the unclipped branch's gradient flows otherwise."""
    ratio_T = torch.exp(log_ratio_T.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    unclipped_T = -adv_T * ratio_T
    clipped_loss_T = -adv_T * ratio_T.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped_T = clipped_loss_T > unclipped_T
    loss_T = torch.where(clipped_T, clipped_loss_T, unclipped_T)
    if clip_ratio_c is not None:
        cap_T = -adv_T * clip_ratio_c
        dual_T = (adv_T < 0) & (loss_T > cap_T)
        loss_T = torch.where(dual_T, cap_T, loss_T)
        clipped_T = clipped_T | dual_T
    return loss_T, ratio_T, clipped_T


def variant_token_terms(logp_T: torch.Tensor, old_logp_T: torch.Tensor, ref_logp_T: Optional[torch.Tensor],
                        adv_T: torch.Tensor, mask_T: torch.Tensor, config,
                        segment_T: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(loss_T, ratio_T, clipped_T, kl_T) per token for a ``losses.grpo.GRPOLossConfig``
    (module docstring); ``logp_T`` carries the gradient, the other inputs are constants.
    Masked tokens take log-ratio 0 (ratio 1, kl 0) and loss 0, as in the kernel."""
    active_T = mask_T != 0
    zeros_T = torch.zeros_like(logp_T)
    log_ratio_T = torch.where(active_T, logp_T - old_logp_T, zeros_T)
    if config.importance_level == "sequence":
        if segment_T is None:
            raise ValueError("grpo.importance_level 'sequence' needs segment_ids (the packed row's sequences)")
        log_ratio_T = sequence_log_ratio(log_ratio_T, mask_T, segment_T)
    loss_T, ratio_T, clipped_T = clipped_surrogate(log_ratio_T, adv_T, config.clip_low, config.clip_high,
                                                   config.clip_ratio_c)
    kl_T = None
    if ref_logp_T is not None:
        kl_T = kl_estimate(torch.where(active_T, ref_logp_T, logp_T), logp_T, config.kl_estimator)
        if config.kl_beta != 0.0:
            loss_T = loss_T + config.kl_beta * kl_T
    return loss_T * mask_T.to(loss_T.dtype), ratio_T.detach(), clipped_T & active_T, kl_T


def segment_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[length] int64 index of the packed sequence each position belongs to, from a row's
    ``cu_seqlens`` [n + 1]; positions past the last boundary (padding) join the last one."""
    bounds = cu_seqlens.to(torch.int64).flatten()[1:]
    positions = torch.arange(length, device=bounds.device)
    return torch.searchsorted(bounds, positions, right=True).clamp(max=max(bounds.numel() - 1, 0))
