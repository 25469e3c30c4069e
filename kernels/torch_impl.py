"""Plain-torch backend: the kernels' math, chunked over rows and vocabulary.

The CPU production path and the GPU fallback. Work happens on ``[rows, cols]`` fp32
tiles of at most ``TILE_ELEMS`` elements, so peak extra memory is a few tiles plus
fp32 ``[T]`` vectors, never an fp32 ``[T, V]`` buffer. The online log-sum-exp is the
one of Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .stats import LOG_RATIO_BOUND, GRPOInputs, GRPOTerms, RowStats, finite_shift

# 2^20 fp32 elements = 4 MiB per temporary tile: large enough that Python overhead is
# small at V ~ 152k, small enough to stay far below a [T, V] buffer.
TILE_ELEMS = 1 << 20
VOCAB_TILE = 1 << 16


def _tiles(n_rows: int, n_cols: int) -> Iterator[tuple[slice, slice]]:
    cols = min(n_cols, VOCAB_TILE)
    rows = max(1, TILE_ELEMS // max(cols, 1))
    for r0 in range(0, n_rows, rows):
        for c0 in range(0, n_cols, cols):
            yield slice(r0, min(r0 + rows, n_rows)), slice(c0, min(c0 + cols, n_cols))


def local_labels(labels_T: torch.Tensor, vocab_start: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label index inside this slice clamped into range, whether this slice holds it)."""
    local_T = labels_T - vocab_start
    held_T = (local_T >= 0) & (local_T < n_cols)
    return local_T.clamp(0, max(n_cols - 1, 0)), held_T


def row_stats(
    logits_TV: torch.Tensor, labels_T: torch.Tensor, vocab_start: int, inv_temp: float, want_centered_mean: bool
) -> RowStats:
    n_rows, n_cols = logits_TV.shape
    dev = logits_TV.device
    max_T = torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=dev)
    sumexp_T = torch.zeros(n_rows, dtype=torch.float32, device=dev)  # sum exp(x - c)
    centered_T = torch.zeros(n_rows, dtype=torch.float32, device=dev) if want_centered_mean else None  # sum e (x - c)
    for rows, cols in _tiles(n_rows, n_cols):
        x = logits_TV[rows, cols].to(torch.float32) * inv_temp
        m_old = max_T[rows]
        m_new = torch.maximum(m_old, x.amax(dim=1))
        shift_new = finite_shift(m_new)
        # exp(m_old - c_new) is 0 while nothing finite was seen (the sums are 0 then too).
        rescale = torch.exp(m_old - shift_new)
        centered_x = x - shift_new[:, None]
        e = torch.exp(centered_x)
        if centered_T is not None:
            # Moving the shift from c_old to c_new adds (c_old - c_new) to every x - c.
            moved = torch.where(rescale > 0, finite_shift(m_old) - shift_new, torch.zeros_like(rescale))
            # exp(-inf) * -inf is nan; a zero probability contributes nothing.
            px = e * torch.where(e > 0, centered_x, torch.zeros_like(x))
            centered_T[rows] = rescale * (centered_T[rows] + moved * sumexp_T[rows]) + px.sum(dim=1)
        sumexp_T[rows] = sumexp_T[rows] * rescale + e.sum(dim=1)
        max_T[rows] = m_new
    local_T, held_T = local_labels(labels_T, vocab_start, n_cols)
    if n_cols:
        picked_T = logits_TV.gather(1, local_T[:, None])[:, 0].to(torch.float32) * inv_temp
    else:
        picked_T = torch.zeros(n_rows, dtype=torch.float32, device=dev)
    target_T = torch.where(held_T, picked_T, torch.zeros_like(picked_T))
    centered_mean_T = centered_T / sumexp_T if centered_T is not None else None
    return RowStats(max_T, torch.log(sumexp_T), target_T, centered_mean_T)


def bounded_log_ratio(log_ratio_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-ratio clamped to +-LOG_RATIO_BOUND, whether it was inside: torch.clamp's gradient mask)."""
    inside_T = (log_ratio_T >= -LOG_RATIO_BOUND) & (log_ratio_T <= LOG_RATIO_BOUND)
    return log_ratio_T.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND), inside_T


def grpo_token_terms(logp_T: torch.Tensor, inputs: GRPOInputs) -> GRPOTerms:
    """Eq. 8 of the R1V2 report per token, plus ``kl_beta`` times the k3 KL estimator.

    Masked tokens take log-ratio 0 (ratio 1, kl 0) before the mask multiplies, so
    garbage behaviour log-probs there cannot turn into nan. Both log-ratios are bounded
    (``stats.LOG_RATIO_BOUND``), and the KL term is left out when ``kl_beta`` is 0, so
    finite logits always give a finite loss and gradient.
    """
    old_logp_T, ref_logp_T, adv_T, mask_T, clip_low, clip_high, kl_beta = inputs
    active_T = mask_T != 0
    zeros_T = torch.zeros_like(logp_T)
    log_ratio_T, ratio_inside_T = bounded_log_ratio(torch.where(active_T, logp_T - old_logp_T, zeros_T))
    ratio_T = torch.exp(log_ratio_T)
    unclipped_T = -adv_T * ratio_T
    clipped_loss_T = -adv_T * ratio_T.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped_T = clipped_loss_T > unclipped_T
    loss_T = torch.maximum(unclipped_T, clipped_loss_T)
    dloss_T = torch.where(clipped_T | ~ratio_inside_T, zeros_T, unclipped_T)
    kl_T = None
    if ref_logp_T is not None:
        diff_T, kl_inside_T = bounded_log_ratio(torch.where(active_T, ref_logp_T - logp_T, zeros_T))
        exp_diff_T = torch.exp(diff_T)
        kl_T = exp_diff_T - diff_T - 1.0
        if kl_beta != 0.0:
            loss_T = loss_T + kl_beta * kl_T
            dloss_T = dloss_T + kl_beta * torch.where(kl_inside_T, 1.0 - exp_diff_T, zeros_T)
    mask_f_T = mask_T.to(torch.float32)
    return GRPOTerms(loss_T * mask_f_T, dloss_T * mask_f_T, ratio_T, clipped_T & active_T, kl_T)


def row_stats_grpo(
    logits_TV: torch.Tensor, labels_T: torch.Tensor, inv_temp: float, inputs: GRPOInputs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, GRPOTerms]:
    """Single-rank forward: (finite row max c, log sum exp(x - c), logp, GRPO terms), [T] each."""
    stats = row_stats(logits_TV, labels_T, 0, inv_temp, want_centered_mean=False)
    logp_T = stats.logprobs()
    terms = grpo_token_terms(logp_T, inputs)
    return finite_shift(stats.row_max), stats.log_sumexp, logp_T, terms


def logits_grad(
    logits_TV: torch.Tensor,
    labels_T: torch.Tensor,
    vocab_start: int,
    inv_temp: float,
    shift_T: torch.Tensor,
    log_sumexp_T: torch.Tensor,
    coef_logp_T: torch.Tensor,
    centered_mean_T: Optional[torch.Tensor],
    coef_entropy_T: Optional[torch.Tensor],
    out_TV: torch.Tensor,
) -> None:
    """Writes d/dlogits of sum_t (coef_logp_t logp_t + coef_entropy_t H_t) into ``out_TV``.

    d logp_t / dx_j = [j = label_t] - p_j and dH_t / dx_j = -p_j (x_j - E_p[x]), with
    x = logits * inv_temp and p_j = exp((x_j - c) - log sum exp(x - c)) recomputed from
    the saved [T] vectors. ``out_TV`` may be ``logits_TV`` itself: each tile is read
    before it is overwritten.
    """
    local_T, held_T = local_labels(labels_T, vocab_start, logits_TV.shape[1])
    for rows, cols in _tiles(*logits_TV.shape):
        centered_x = logits_TV[rows, cols].to(torch.float32) * inv_temp - shift_T[rows, None]
        p = torch.exp(centered_x - log_sumexp_T[rows, None])
        grad = p * (-coef_logp_T[rows, None])
        if coef_entropy_T is not None:
            deviation = torch.where(p > 0, centered_x - centered_mean_T[rows, None], torch.zeros_like(p))
            grad -= coef_entropy_T[rows, None] * p * deviation
        col_T = local_T[rows] - cols.start
        hit_T = held_T[rows] & (col_T >= 0) & (col_T < p.shape[1])
        hit_rows = hit_T.nonzero()[:, 0]
        grad[hit_rows, col_T[hit_rows]] += coef_logp_T[rows][hit_rows]
        out_TV[rows, cols] = grad * inv_temp
