"""Mixed Preference Optimization (MPO), the first R1V2 stage (report section 3.2, Eq. 2-5).

MPO (Wang et al., "Enhancing the Reasoning Ability of Multimodal Large Language Models
via Mixed Preference Optimization", 2024) sums three losses over preference pairs
(x, y_c, y_r), with the implicit reward r(y) = beta log(pi(y|x) / pi_ref(y|x)):

    L = w_p L_p + w_q L_q + w_g L_g                                           (Eq. 2)
    L_p = -log sigma(r(y_c) - r(y_r))                    preference, DPO      (Eq. 3)
    L_q = -log sigma(r(y_c) - delta) - log sigma(-(r(y_r) - delta))
                                                         quality, BCO         (Eq. 4)
    L_g = -log pi(y_c|x) / |y_c|                         generation, NLL      (Eq. 5)

delta is the running mean of past rewards (BCO, Jung et al., 2024): each batch's mean of
its chosen and rejected rewards is folded into the mean before the batch's loss is
computed, so delta is stateful; :class:`RewardMean` holds that state and is saved with
training checkpoints. Default weights (w_p, w_q, w_g) = (0.8, 0.2, 1.0) as in the report.

All functions take per-sequence summed log-probs ``[N]`` (response tokens only) and
return the batch mean; they are pure apart from :meth:`RewardMean.update`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MPOConfig:
    beta: float = 0.1
    """Scale of the implicit reward r(y) = beta log(pi / pi_ref)."""
    preference_weight: float = 0.8
    """w_p of Eq. 2 (the DPO term, Eq. 3)."""
    quality_weight: float = 0.2
    """w_q of Eq. 2 (the BCO term, Eq. 4)."""
    generation_weight: float = 1.0
    """w_g of Eq. 2 (the length-normalized NLL of the chosen response, Eq. 5)."""

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@dataclass
class RewardMean:
    """The running mean of implicit rewards that BCO's delta is (Eq. 4)."""

    mean: float = 0.0
    count: int = 0

    def update(self, rewards: torch.Tensor) -> float:
        """Folds ``rewards`` (any shape) into the mean; returns the new mean (delta)."""
        n = rewards.numel()
        if n:
            batch_mean = float(rewards.detach().double().mean())
            self.count += n
            self.mean += (batch_mean - self.mean) * n / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


def implicit_rewards(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """r(y) = beta (log pi(y|x) - log pi_ref(y|x)), per sequence."""
    return beta * (policy_logp - ref_logp)


def preference_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Eq. 3 (DPO): mean of -log sigma(r(y_c) - r(y_r))."""
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def quality_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, delta: float) -> torch.Tensor:
    """Eq. 4 (BCO): mean of -log sigma(r(y_c) - delta) - log sigma(-(r(y_r) - delta))."""
    return (-F.logsigmoid(reward_chosen - delta) - F.logsigmoid(-(reward_rejected - delta))).mean()


def generation_loss(policy_logp_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Eq. 5: mean of -log pi(y_c|x) / |y_c| (the chosen response's per-token NLL)."""
    if (chosen_lengths < 1).any():
        raise ValueError(f"chosen responses need >= 1 token, got lengths {chosen_lengths.tolist()}")
    return (-policy_logp_chosen / chosen_lengths.to(policy_logp_chosen.dtype)).mean()


class MPOLoss(NamedTuple):
    loss: torch.Tensor
    preference: torch.Tensor
    quality: torch.Tensor
    generation: torch.Tensor
    delta: float
    reward_accuracy: float
    """Share of pairs whose chosen reward exceeds the rejected one."""
    reward_margin: float


def mpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    config: MPOConfig,
    reward_mean: RewardMean,
) -> MPOLoss:
    """Eq. 2 over a batch of pairs; updates ``reward_mean`` (delta) with this batch first."""
    r_c = implicit_rewards(policy_chosen, ref_chosen, config.beta)
    r_r = implicit_rewards(policy_rejected, ref_rejected, config.beta)
    delta = reward_mean.update(torch.cat([r_c, r_r]))
    l_p, l_q = preference_loss(r_c, r_r), quality_loss(r_c, r_r, delta)
    l_g = generation_loss(policy_chosen, chosen_lengths)
    total = config.preference_weight * l_p + config.quality_weight * l_q + config.generation_weight * l_g
    margin = (r_c - r_r).detach()
    return MPOLoss(total, l_p, l_q, l_g, delta, float((margin > 0).float().mean()), float(margin.mean()))
