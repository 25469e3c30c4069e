"""KL to the reference as a reward penalty (``grpo.kl_placement: reward``), as verl's ``use_kl_in_reward``.

Eq. 8 of the R1V2 report puts beta KL(pi || pi_ref) in the loss, per token (``kl_placement:
loss``, the default). verl's alternative (``algorithm.use_kl_in_reward``, its
``apply_kl_penalty``; the PPO-RLHF reward of Ouyang et al. 2022, Eq. 2) moves it into the
reward instead: the sequence reward of each fresh response i becomes

    r'_i = r_i - beta sum_t m_t kl_t,   kl_t = estimator(x_t),  x_t = clamp(log pi_ref(y_t) - log pi_old(y_t), +-20)

with pi_old the policy before this step's update (the policy that the rollout engine ran)
and the estimator ``grpo.kl_estimator`` (k1 / k2 / k3, ``losses.grpo_variants.kl_estimate``,
the same clamp to +-``LOG_RATIO_BOUND`` as the loss path, so the two placements differ only
in where the term enters). The group advantages of Eq. 6 are then computed from r'; the KL
term is not in the loss (its beta is 0 there), so no gradient flows through it: it acts
only through the advantages. (verl's token-level penalty puts beta kl_t on each token's
reward; with GRPO's outcome advantage, which sums the token rewards, that is exactly the
sequence sum here.)
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_r1v.losses.grpo_variants import kl_estimate


def sequence_kl(ref_logp_T: torch.Tensor, logp_T: torch.Tensor, mask_T: torch.Tensor, estimator: str) -> float:
    """sum_t m_t kl_t of one response (module docstring), in fp64; ``mask_T`` marks its
    response tokens (positions outside it contribute nothing, whatever their values)."""
    active_T = mask_T.to(torch.bool)
    kl_T = kl_estimate(ref_logp_T.to(torch.float64), logp_T.to(torch.float64), estimator)
    return float(torch.where(active_T, kl_T, torch.zeros_like(kl_T)).sum())


def kl_shaped_rewards(rewards_G: np.ndarray, kl_sums_G: np.ndarray, beta: float) -> np.ndarray:
    """r'_i = r_i - beta sum_t kl_t for a group's G responses (fp64; module docstring)."""
    rewards, kl = np.asarray(rewards_G, dtype=np.float64), np.asarray(kl_sums_G, dtype=np.float64)
    if rewards.shape != kl.shape:
        raise ValueError(f"rewards {rewards.shape} and KL sums {kl.shape} must have the same shape")
    return rewards - beta * kl
