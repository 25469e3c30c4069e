"""GRPO advantages (Eq. 6) and objective (Eq. 8 + k3 KL) of the Skywork R1V2 report.

Eq. 6, group-relative advantage of response i among the G responses to one prompt:

    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)

with the unbiased (Bessel) standard deviation, as DeepSeekMath's GRPO implementations
compute it; a group whose rewards are all equal has std 0 and gets A = 0 exactly (no
learning signal: the "vanishing advantages" the Selective Sample Buffer works around).

The division by std makes A scale-free: a group whose rewards differ by 1e-3 gets
advantages as large as one whose rewards differ by 1. With a continuous reward-model
term in Eq. 7 almost no group is exactly flat, so nearly-flat groups would turn the
reward model's noise into full-size gradients. :func:`effective_groups` is therefore the
one effective-group criterion: rewards not all equal and std >= ``min_std``
(``ssb.min_reward_std``, resolved by ``ssb.policy.resolve_min_reward_std``); groups that
fail it get A = 0, and everything downstream (the SSB's insert filter, its top-up, the
``ssb/effective_ratio_*`` metrics) reads "effective" off non-zero advantages. With
``min_std = 0`` only exactly flat groups fail it, bit for bit the plain Eq. 6.

Eq. 8, the clipped objective averaged per sequence, then over the G sequences:

    J = 1/G sum_i 1/|o_i| sum_t [ min(r_it A_i, clip(r_it, 1 - e_low, 1 + e_high) A_i) - beta KL_it ]

The per-token term comes from :func:`megatron_r1v.kernels.grpo_loss` (fused, vocab
parallel). Micro-batches hold only some of the sequences, so the normalization is carried
as a per-token weight: 1 / (|o_i| N) for the per-sequence mean over N sequences of the
whole step (``normalization="sequence"``, Eq. 8), or 1 / (total response tokens) for a
token-level mean (``"token"``, as in DAPO). Summing ``weight * loss`` over every
micro-batch of a step then gives exactly -J.

Variants, each a ``grpo.*`` switch whose default is the objective above: the KL estimator
(k1 / k2 / k3), verl's dual clip for negative advantages, GSPO's sequence-level ratio
(``losses.grpo_variants``, computed in torch from the kernel's differentiable log-probs;
the fused kernel runs the default only), and Dr. GRPO's advantage without the std
division (:func:`group_advantages`) and constant length normalizer (:func:`token_weights`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

from megatron_r1v.kernels import grpo_loss, vocab_parallel_logprobs
from megatron_r1v.losses.grpo_variants import IMPORTANCE_LEVELS, KL_ESTIMATORS, variant_token_terms


@dataclass(frozen=True)
class GRPOLossConfig:
    clip_low: float = 0.2
    """The ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.2
    """The ratio is clipped above at 1 + clip_high (a larger value is DAPO's clip-higher)."""
    kl_beta: float = 0.0
    """Weight of the KL penalty to the reference policy (0: no reference pass)."""
    temperature: float = 1.0
    """The sampling temperature: log-probs are those of softmax(logits / temperature)."""
    normalization: Literal["sequence", "token", "constant"] = "sequence"
    """``sequence``: mean over each response, then over responses (Eq. 8); ``token``: mean over all
    tokens; ``constant``: Dr. GRPO's fixed length normalizer (:func:`token_weights`)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (``losses.grpo_variants.kl_estimate``); k3 is the report's and the fused kernel's."""
    clip_ratio_c: Optional[float] = None
    """Dual clip: the loss of a token with A < 0 is capped at -A clip_ratio_c (> 1); None: off."""
    importance_level: Literal["token", "sequence"] = "token"
    """``token``: per-token ratios (Eq. 8); ``sequence``: GSPO's length-normalized sequence ratio."""

    def __post_init__(self):
        if self.normalization not in ("sequence", "token", "constant"):
            raise ValueError(f"normalization must be 'sequence', 'token' or 'constant', got {self.normalization!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"importance_level must be one of {IMPORTANCE_LEVELS}, got {self.importance_level!r}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (or None), got {self.clip_ratio_c}")

    @property
    def fused(self) -> bool:
        """Whether the fused kernel computes the loss (the default objective; module docstring)."""
        return self.kl_estimator == "k3" and self.clip_ratio_c is None and self.importance_level == "token"


def _check_rewards(rewards_NG: torch.Tensor, min_std: float) -> torch.Tensor:
    """``rewards_NG`` as fp32 (the precision Eq. 6 runs in), after checking shape and ``min_std``."""
    if rewards_NG.dim() != 2 or rewards_NG.shape[1] < 2:
        raise ValueError(f"rewards must be [n_prompts, G] with G >= 2, got {tuple(rewards_NG.shape)}")
    if not (math.isfinite(min_std) and min_std >= 0):
        raise ValueError(f"min_std (ssb.min_reward_std) must be a finite number >= 0, got {min_std}")
    return rewards_NG.to(torch.float32)


def _effective_N1(rewards: torch.Tensor, std_N1: torch.Tensor, min_std: float) -> torch.Tensor:
    # An all-equal group can show a std of a few ulps from the mean's rounding: exact
    # flatness is tested on the values themselves, not as std > 0.
    flat_N1 = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return ~flat_N1 & ~(std_N1 < min_std)


def effective_groups(rewards_NG: torch.Tensor, min_std: float = 0.0) -> torch.Tensor:
    """[n_prompts] bool: the groups with a learning signal under Eq. 6 (module docstring):
    rewards not all equal, and their unbiased fp32 std at least ``min_std``."""
    rewards = _check_rewards(rewards_NG, min_std)
    return _effective_N1(rewards, rewards.std(dim=1, keepdim=True), min_std)[:, 0]


def group_advantages(rewards_NG: torch.Tensor, eps: float = 1e-6, min_std: float = 0.0,
                     std_normalize: bool = True) -> torch.Tensor:
    """Eq. 6 for ``[n_prompts, G]`` rewards; fp32, zero for the groups :func:`effective_groups`
    rejects (equal rewards, or a std below ``min_std``), so nearly-flat groups put no
    std-amplified noise into Eq. 8.

    ``std_normalize=False`` is Dr. GRPO's advantage (Liu et al. 2025, "Understanding R1-Zero-Like
    Training: A Critical Perspective", Sec. 3.2): A_i = r_i - mean_j r_j, no division by the std
    (which up-weights nearly-flat groups); the effective-group criterion still applies."""
    rewards = _check_rewards(rewards_NG, min_std)
    mean_N1 = rewards.mean(dim=1, keepdim=True)
    std_N1 = rewards.std(dim=1, keepdim=True)
    centered = rewards - mean_N1
    keep_N1 = _effective_N1(rewards, std_N1, min_std)
    return torch.where(keep_N1, centered / (std_N1 + eps) if std_normalize else centered, torch.zeros_like(centered))


def token_weights(
    response_lengths: torch.Tensor, normalization: str, total_sequences: int, total_tokens: int,
    length_constant: Optional[int] = None,
) -> torch.Tensor:
    """Per-sequence weight of each of its tokens so that sum(weight * loss) over a step is the mean.

    ``response_lengths`` [n] are this micro-batch's |o_i|; ``total_sequences`` and
    ``total_tokens`` count the whole step (all micro-batches, all data-parallel ranks).
    ``constant`` is Dr. GRPO's normalizer (Liu et al. 2025, Sec. 3.2): 1/|o_i| becomes
    1 / ``length_constant`` (a fixed budget such as the generation limit), so a long response
    is not down-weighted per token: weight 1 / (length_constant N).
    """
    if (response_lengths < 1).any():
        raise ValueError(f"every response needs >= 1 token, got lengths {response_lengths.tolist()}")
    lengths = response_lengths.to(torch.float32)
    if normalization == "sequence":
        return 1.0 / (lengths * total_sequences)
    if normalization == "token":
        return torch.full_like(lengths, 1.0 / total_tokens)
    if normalization == "constant":
        if length_constant is None or length_constant < 1:
            raise ValueError(f"normalization 'constant' needs a length_constant >= 1, got {length_constant}")
        return torch.full_like(lengths, 1.0 / (float(length_constant) * total_sequences))
    raise ValueError(f"normalization must be 'sequence', 'token' or 'constant', got {normalization!r}")


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor
    """Scalar: sum_t weight_t loss_t over this micro-batch (differentiable)."""
    kl_mean: Optional[float]
    clip_fraction: float
    """Share of response tokens whose clipped branch is active."""
    logprobs: torch.Tensor
    """Per-token log-probs under the current policy (no gradient)."""


def grpo_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    weights: torch.Tensor,
    config: GRPOLossConfig,
    tp_group: Optional[dist.ProcessGroup] = None,
    backend: str = "auto",
    inplace: bool = False,
    segment_ids: Optional[torch.Tensor] = None,
) -> GRPOLossOutput:
    """The weighted Eq. 8 loss of one micro-batch, all per-token inputs ``[T]``.

    ``weights`` are per token (see :func:`token_weights`, broadcast over each response);
    ``advantages`` likewise carry each response's A_i on its tokens. The default objective
    runs in the fused kernel; a variant (``config.fused`` false) in torch on the kernel's
    differentiable log-probs (``losses.grpo_variants``). ``segment_ids`` [T] number the
    packed sequences (``grpo_variants.segment_ids``), needed by ``importance_level='sequence'``.
    """
    ref = ref_logprobs if config.kl_beta else None
    if config.fused:
        loss_T, stats = grpo_loss(
            logits, labels, old_logprobs, ref, advantages, loss_mask,
            clip_low=config.clip_low, clip_high=config.clip_high, kl_beta=config.kl_beta,
            temperature=config.temperature, tp_group=tp_group, backend=backend, inplace=inplace,
        )
        logp_T, clipped_T, kl_T = stats.logprobs, stats.clipped, stats.kl
    else:
        if ref is None and config.kl_beta != 0.0:
            raise ValueError(f"kl_beta = {config.kl_beta} needs ref_logprobs")
        logp_T, _ = vocab_parallel_logprobs(logits, labels, tp_group=tp_group, temperature=config.temperature,
                                            backend=backend, inplace=inplace)
        consts = [None if v is None else v.detach().to(logp_T.device, torch.float32)
                  for v in (old_logprobs, ref, advantages, loss_mask)]
        loss_T, _, clipped_T, kl_T = variant_token_terms(logp_T, *consts, config, segment_ids)
        logp_T, kl_T = logp_T.detach(), None if kl_T is None else kl_T.detach()
    mask_T = loss_mask.to(torch.float32)
    n_tokens = float(mask_T.sum())
    loss = (loss_T * weights.to(loss_T.dtype)).sum()
    kl_mean = float((kl_T * mask_T).sum()) / n_tokens if kl_T is not None and n_tokens else None
    clip_fraction = float(clipped_T.float().sum()) / n_tokens if n_tokens else 0.0
    return GRPOLossOutput(loss, kl_mean, clip_fraction, logp_T)


def truncated_is_weights(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS) weights ``min(pi_old / pi_engine, cap)`` per token.

    The rollout engine samples from its own numerics (other kernels, precision, batch
    shapes) while Eq. 8's ratio is taken against the trainer's old policy pi_old; the
    tokens are therefore drawn from pi_engine, not pi_old. Weighting each token's term by
    pi_old / pi_engine makes it an expectation under pi_old again; truncating the weight at
    ``cap`` bounds the variance that a token the engine found unlikely would add (Yao et
    al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training").
    No gradient flows through the weights. Inputs are per-token log-probs of the sampled
    tokens, ``[T]``.
    """
    if cap < 1.0:
        raise ValueError(f"the TIS cap must be >= 1, got {cap}")
    if trainer_logprobs.shape != engine_logprobs.shape:
        raise ValueError(f"trainer and engine log-probs differ in shape: {tuple(trainer_logprobs.shape)} vs "
                         f"{tuple(engine_logprobs.shape)}")
    log_ratio = (trainer_logprobs.detach().double() - engine_logprobs.detach().double())
    # Clamped in log space first so a huge gap cannot overflow exp.
    return torch.exp(log_ratio.clamp(max=math.log(cap))).to(torch.float32)
