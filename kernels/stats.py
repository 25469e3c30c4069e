"""Per-row results shared by every backend (all fp32 ``[T]``; none is ever ``[T, V]``)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# Bound on the log-ratios that are exponentiated: log(pi / pi_old) in the ratio and
# ref - logp in the k3 term. fp32 exp overflows above 88.7, and a token the policy now
# finds far less (or more) likely than the behaviour or reference policy reaches that
# easily: logits of +-1e4 give log-probs near -2e4, and groups replayed from the Selective
# Sample Buffer keep log-probs of an older policy. The value is verl's (its ratio and
# low-variance KL clamp at +-20): e^20 = 4.9e8 keeps every product with an advantage or a
# weight finite in fp32, and a token that far off-policy carries no trustworthy signal.
# Each log-ratio is clamped as torch.clamp would (outside the bound the term is constant,
# so its gradient is 0), which every backend reproduces exactly. Two consequences, as in
# verl: below -20 the k3 term's true gradient (about beta) is dropped too, and a token with
# A < 0 whose log-ratio exceeds +20 adds |A| e^20 to the reported loss with no gradient and
# is not counted as clipped.
LOG_RATIO_BOUND = 20.0


def finite_shift(row_max_T: torch.Tensor) -> torch.Tensor:
    """The row maximum, with 0 for rows that are -inf throughout (exp(-inf - -inf) is nan)."""
    return torch.where(torch.isinf(row_max_T), torch.zeros_like(row_max_T), row_max_T)


class RowStats(NamedTuple):
    """Statistics of ``x = logits / temperature`` over one rank's vocab slice (or, after
    :func:`megatron_r1v.kernels.vocab_parallel.combine_over_tp`, the whole vocabulary).

    Everything is kept relative to the row maximum c (``finite_shift(row_max)``) because
    the log-sum-exp itself loses the digits that matter: with logits near 2e4, fp32 holds
    lse to 2e-3, while ``x - c`` and ``log sum exp(x - c)`` stay exact to ~1e-7.

    ``row_max``: max_j x_j (-inf for an all -inf slice); ``log_sumexp``: log sum_j
    exp(x_j - c); ``target``: x at the row's label when this slice holds it, else 0;
    ``centered_mean``: sum_j softmax(x)_j (x_j - c), for the entropy, or None.
    """

    row_max: torch.Tensor
    log_sumexp: torch.Tensor
    target: torch.Tensor
    centered_mean: Optional[torch.Tensor]

    def logprobs(self) -> torch.Tensor:
        return (self.target - finite_shift(self.row_max)) - self.log_sumexp

    def entropy(self) -> torch.Tensor:
        """H = lse - E_p[x] = log sum exp(x - c) - E_p[x - c]."""
        assert self.centered_mean is not None
        return self.log_sumexp - self.centered_mean


class GRPOTerms(NamedTuple):
    """Per-token GRPO quantities (Eq. 8 of the R1V2 report plus the k3 KL term).

    ``loss``: mask * (max(-A r, -A clip(r)) + beta * kl), the KL term left out when beta is 0;
    ``dloss_dlogp``: its derivative in the token's log-prob, saved for backward; ``ratio``:
    r = exp(b(logp - old_logp)); ``clipped``: whether the clipped branch is active (zero
    gradient); ``kl``: the k3 estimator exp(b(ref - logp)) - b(ref - logp) - 1, or None
    without reference log-probs. b clamps to +-``LOG_RATIO_BOUND``.
    """

    loss: torch.Tensor
    dloss_dlogp: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    kl: Optional[torch.Tensor]


class GRPOInputs(NamedTuple):
    """The per-token inputs and scalars of the GRPO loss, fp32 ``[T]`` vectors on the logits' device."""

    old_logp: torch.Tensor
    ref_logp: Optional[torch.Tensor]
    advantages: torch.Tensor
    mask: torch.Tensor
    clip_low: float
    clip_high: float
    kl_beta: float
