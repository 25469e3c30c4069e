"""Triton backend: one program per token row streams its vocabulary slice in tiles.

Forward (``_row_stats_kernel`` / ``_grpo_fwd_kernel``): a single read of the row with
an online max / sum-exp (Milakov & Gimelshein, 2018) in fp32, plus one load of the
target logit; writes fp32 [T] vectors only. With one TP rank the GRPO kernel also
finishes the per-token loss (Eq. 8 + k3 KL, see :mod:`grpo`), so forward is one launch.
Backward (``_logits_grad_kernel``): one read and one write of the row, recomputing
p = exp((x - c) - log sum exp(x - c)) from saved [T] vectors; the write may target the
logits buffer itself (each tile is loaded before it is stored; programs own disjoint rows).

Runs compiled on CUDA and, with ``TRITON_INTERPRET=1`` set before Triton is imported,
in Triton's interpreter on CPU tensors (tests). The interpreter cannot do arithmetic on
bf16 tiles, hence every load is converted to fp32 first.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreting
from .stats import LOG_RATIO_BOUND, GRPOInputs, GRPOTerms, RowStats

# A constexpr global: Triton folds it into the kernels.
_LOG_RATIO_BOUND = tl.constexpr(LOG_RATIO_BOUND)


@triton.jit
def _online_stats(row_ptr, n_cols, inv_temp, WANT_CENTERED_MEAN: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max x, log sum exp(x - c), E_p[x - c]) of one row, c the finite max (see stats.RowStats)."""
    run_max = tl.full([], float("-inf"), tl.float32)
    sumexp = tl.zeros([], tl.float32)
    centered = tl.zeros([], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * inv_temp
        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        # Keep the shift finite while everything seen is -inf: exp(-inf - -inf) is nan.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        centered_x = x - shift
        e = tl.exp(centered_x)
        if WANT_CENTERED_MEAN:
            moved = tl.where(rescale > 0, tl.where(run_max == float("-inf"), 0.0, run_max) - shift, 0.0)
            px = e * tl.where(e > 0, centered_x, 0.0)
            centered = rescale * (centered + moved * sumexp) + tl.sum(px, axis=0)
        sumexp = sumexp * rescale + tl.sum(e, axis=0)
        run_max = new_max
    return run_max, tl.log(sumexp), centered / sumexp


@triton.jit
def _target_logit(row_ptr, label_ptr, vocab_start, n_cols, inv_temp):
    local = tl.load(label_ptr) - vocab_start
    held = (local >= 0) & (local < n_cols)
    x_t = tl.load(row_ptr + local, mask=held, other=0.0).to(tl.float32) * inv_temp
    return tl.where(held, x_t, 0.0)


@triton.jit
def _bounded_log_ratio(log_ratio):
    """(log-ratio clamped to +-LOG_RATIO_BOUND, whether it was inside); see stats.LOG_RATIO_BOUND."""
    inside = (log_ratio >= -_LOG_RATIO_BOUND) & (log_ratio <= _LOG_RATIO_BOUND)
    return tl.minimum(tl.maximum(log_ratio, -_LOG_RATIO_BOUND), _LOG_RATIO_BOUND), inside


@triton.jit
def _grpo_terms(logp, old, ref, adv, weight, clip_low, clip_high, kl_beta, HAS_REF: tl.constexpr):
    active = weight != 0
    log_ratio, ratio_inside = _bounded_log_ratio(tl.where(active, logp - old, 0.0))
    ratio = tl.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_loss = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    is_clipped = clipped_loss > unclipped
    loss = tl.maximum(unclipped, clipped_loss)
    dloss = tl.where(is_clipped | (ratio_inside == 0), 0.0, unclipped)
    kl = ratio * 0.0
    if HAS_REF:
        diff, kl_inside = _bounded_log_ratio(tl.where(active, ref - logp, 0.0))
        exp_diff = tl.exp(diff)
        kl = exp_diff - diff - 1.0
        # kl_beta = 0 leaves the term out (not 0 * kl), as the torch backend does.
        loss = tl.where(kl_beta != 0.0, loss + kl_beta * kl, loss)
        dloss = tl.where(kl_beta != 0.0, dloss + kl_beta * tl.where(kl_inside, 1.0 - exp_diff, 0.0), dloss)
    return loss * weight, dloss * weight, ratio, is_clipped & active, kl


@triton.jit
def _row_stats_kernel(
    logits_ptr, row_stride, labels_ptr, vocab_start, n_cols, inv_temp,
    max_ptr, log_sumexp_ptr, target_ptr, centered_mean_ptr,
    WANT_CENTERED_MEAN: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    row_max, log_sumexp, centered_mean = _online_stats(row_ptr, n_cols, inv_temp, WANT_CENTERED_MEAN, BLOCK_V)
    tl.store(max_ptr + row, row_max)
    tl.store(log_sumexp_ptr + row, log_sumexp)
    tl.store(target_ptr + row, _target_logit(row_ptr, labels_ptr + row, vocab_start, n_cols, inv_temp))
    if WANT_CENTERED_MEAN:
        tl.store(centered_mean_ptr + row, centered_mean)


@triton.jit
def _grpo_fwd_kernel(
    logits_ptr, row_stride, labels_ptr, n_cols, inv_temp,
    old_ptr, ref_ptr, adv_ptr, weight_ptr, clip_low, clip_high, kl_beta,
    shift_ptr, log_sumexp_ptr, logp_ptr, loss_ptr, dloss_ptr, ratio_ptr, clipped_ptr, kl_ptr,
    HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    row_max, log_sumexp, _ = _online_stats(row_ptr, n_cols, inv_temp, False, BLOCK_V)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    logp = (_target_logit(row_ptr, labels_ptr + row, 0, n_cols, inv_temp) - shift) - log_sumexp
    ref = tl.load(ref_ptr + row) if HAS_REF else 0.0
    loss, dloss, ratio, is_clipped, kl = _grpo_terms(
        logp, tl.load(old_ptr + row), ref, tl.load(adv_ptr + row), tl.load(weight_ptr + row),
        clip_low, clip_high, kl_beta, HAS_REF,
    )
    tl.store(shift_ptr + row, shift)
    tl.store(log_sumexp_ptr + row, log_sumexp)
    tl.store(logp_ptr + row, logp)
    tl.store(loss_ptr + row, loss)
    tl.store(dloss_ptr + row, dloss)
    tl.store(ratio_ptr + row, ratio)
    tl.store(clipped_ptr + row, is_clipped.to(tl.int8))
    if HAS_REF:
        tl.store(kl_ptr + row, kl)


@triton.jit
def _grpo_terms_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, weight_ptr, n_tokens, clip_low, clip_high, kl_beta,
    loss_ptr, dloss_ptr, ratio_ptr, clipped_ptr, kl_ptr, HAS_REF: tl.constexpr, BLOCK_T: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = offs < n_tokens
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0) if HAS_REF else logp * 0.0
    loss, dloss, ratio, is_clipped, kl = _grpo_terms(
        logp, tl.load(old_ptr + offs, mask=valid, other=0.0), ref, tl.load(adv_ptr + offs, mask=valid, other=0.0),
        tl.load(weight_ptr + offs, mask=valid, other=0.0), clip_low, clip_high, kl_beta, HAS_REF,
    )
    tl.store(loss_ptr + offs, loss, mask=valid)
    tl.store(dloss_ptr + offs, dloss, mask=valid)
    tl.store(ratio_ptr + offs, ratio, mask=valid)
    tl.store(clipped_ptr + offs, is_clipped.to(tl.int8), mask=valid)
    if HAS_REF:
        tl.store(kl_ptr + offs, kl, mask=valid)


@triton.jit
def _logits_grad_kernel(
    logits_ptr, row_stride, grad_ptr, grad_row_stride, labels_ptr, vocab_start, n_cols, inv_temp,
    shift_ptr, log_sumexp_ptr, coef_logp_ptr, centered_mean_ptr, coef_entropy_ptr,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    shift = tl.load(shift_ptr + row)
    log_sumexp = tl.load(log_sumexp_ptr + row)
    coef = tl.load(coef_logp_ptr + row)
    local = tl.load(labels_ptr + row) - vocab_start
    if HAS_ENTROPY:
        centered_mean = tl.load(centered_mean_ptr + row)
        coef_h = tl.load(coef_entropy_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        # Padding columns load -inf: p = 0 there instead of exp() overflowing on -shift.
        centered_x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temp - shift
        p = tl.exp(centered_x - log_sumexp)
        grad = tl.where(cols == local, coef, 0.0) - coef * p
        if HAS_ENTROPY:
            grad -= coef_h * p * tl.where(p > 0, centered_x - centered_mean, 0.0)
        tl.store(grad_row_ptr + cols, (grad * inv_temp).to(grad_ptr.dtype.element_ty), mask=in_row)


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``n_cols`` logits.

    GPU: 4096-wide tiles with 8 warps keep 16 elements per thread in flight, enough to
    saturate HBM at V/tp >= 19k (measured with tools/bench_kernels.py, docs/benchmarks.md).
    The interpreter runs one numpy op per tile, so fewer, wider tiles are faster there.
    """
    block = triton.next_power_of_2(max(n_cols, 16))
    if triton_interpreting():
        return min(block, 8192), 4
    return min(block, 4096), 8 if block >= 2048 else 4


def _f32(n: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=device)


def row_stats(
    logits_TV: torch.Tensor, labels_T: torch.Tensor, vocab_start: int, inv_temp: float, want_centered_mean: bool
) -> RowStats:
    n_rows, n_cols = logits_TV.shape
    dev = logits_TV.device
    max_T, log_sumexp_T, target_T = _f32(n_rows, dev), _f32(n_rows, dev), _f32(n_rows, dev)
    centered_mean_T = _f32(n_rows, dev) if want_centered_mean else None
    if n_rows:
        block, warps = launch_config(n_cols)
        _row_stats_kernel[(n_rows,)](
            logits_TV, logits_TV.stride(0), labels_T, vocab_start, n_cols, inv_temp,
            max_T, log_sumexp_T, target_T, centered_mean_T if want_centered_mean else max_T,
            WANT_CENTERED_MEAN=want_centered_mean, BLOCK_V=block, num_warps=warps,
        )
    return RowStats(max_T, log_sumexp_T, target_T, centered_mean_T)


def _grpo_outputs(n: int, device: torch.device, has_ref: bool):
    kl_T = _f32(n, device) if has_ref else None
    return _f32(n, device), _f32(n, device), _f32(n, device), torch.empty(n, dtype=torch.int8, device=device), kl_T


def grpo_token_terms(logp_T: torch.Tensor, inputs: GRPOInputs) -> GRPOTerms:
    old_logp_T, ref_logp_T, adv_T, mask_T, clip_low, clip_high, kl_beta = inputs
    n = logp_T.shape[0]
    has_ref = ref_logp_T is not None
    loss_T, dloss_T, ratio_T, clipped_T, kl_T = _grpo_outputs(n, logp_T.device, has_ref)
    if n:
        block = 1024
        _grpo_terms_kernel[(triton.cdiv(n, block),)](
            logp_T, old_logp_T, ref_logp_T if has_ref else old_logp_T, adv_T, mask_T, n, clip_low, clip_high,
            kl_beta, loss_T, dloss_T, ratio_T, clipped_T, kl_T if has_ref else loss_T,
            HAS_REF=has_ref, BLOCK_T=block,
        )
    return GRPOTerms(loss_T, dloss_T, ratio_T, clipped_T.view(torch.bool), kl_T)


def row_stats_grpo(
    logits_TV: torch.Tensor, labels_T: torch.Tensor, inv_temp: float, inputs: GRPOInputs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, GRPOTerms]:
    old_logp_T, ref_logp_T, adv_T, mask_T, clip_low, clip_high, kl_beta = inputs
    n_rows, n_cols = logits_TV.shape
    dev = logits_TV.device
    has_ref = ref_logp_T is not None
    shift_T, log_sumexp_T, logp_T = _f32(n_rows, dev), _f32(n_rows, dev), _f32(n_rows, dev)
    loss_T, dloss_T, ratio_T, clipped_T, kl_T = _grpo_outputs(n_rows, dev, has_ref)
    if n_rows:
        block, warps = launch_config(n_cols)
        _grpo_fwd_kernel[(n_rows,)](
            logits_TV, logits_TV.stride(0), labels_T, n_cols, inv_temp,
            old_logp_T, ref_logp_T if has_ref else old_logp_T, adv_T, mask_T, clip_low, clip_high, kl_beta,
            shift_T, log_sumexp_T, logp_T, loss_T, dloss_T, ratio_T, clipped_T, kl_T if has_ref else loss_T,
            HAS_REF=has_ref, BLOCK_V=block, num_warps=warps,
        )
    terms = GRPOTerms(loss_T, dloss_T, ratio_T, clipped_T.view(torch.bool), kl_T)
    return shift_T, log_sumexp_T, logp_T, terms


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
    n_rows, n_cols = logits_TV.shape
    if not n_rows:
        return
    has_entropy = coef_entropy_T is not None
    block, warps = launch_config(n_cols)
    _logits_grad_kernel[(n_rows,)](
        logits_TV, logits_TV.stride(0), out_TV, out_TV.stride(0), labels_T, vocab_start, n_cols, inv_temp,
        shift_T, log_sumexp_T, coef_logp_T, centered_mean_T if has_entropy else shift_T,
        coef_entropy_T if has_entropy else shift_T, HAS_ENTROPY=has_entropy, BLOCK_V=block, num_warps=warps,
    )
