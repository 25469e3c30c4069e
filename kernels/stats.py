"""Per-row results shared by every backend (all fp32 ``[T]``; none is ever ``[T, V]``)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


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

    ``loss``: mask * (max(-A r, -A clip(r)) + beta * kl); ``dloss_dlogp``: its derivative
    in the token's log-prob, saved for backward; ``ratio``: r = exp(logp - old_logp);
    ``clipped``: whether the clipped branch is active (zero gradient); ``kl``: the k3
    estimator exp(ref - logp) - (ref - logp) - 1, or None without reference log-probs.
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
