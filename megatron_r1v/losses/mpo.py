"""Mixed Preference Optimization (MPO), the first R1V2 stage (report section 3.2, Eq. 2-5).

MPO (Wang et al., "Enhancing the Reasoning Ability of Multimodal Large Language Models
via Mixed Preference Optimization", 2024) sums three losses over preference pairs
(x, y_c, y_r), with the implicit reward r(y) = beta log(pi(y|x) / pi_ref(y|x)):

    L = w_p L_p + w_q L_q + w_g L_g                                           (Eq. 2)
    L_p = -log sigma(r(y_c) - r(y_r))                    preference, DPO      (Eq. 3)
    L_q = -log sigma(r(y_c) - delta) - log sigma(-(r(y_r) - delta))
                                                         quality, BCO         (Eq. 4)
    L_g = -log pi(y_c|x) / |y_c|                         generation, NLL      (Eq. 5)

delta is the running mean of past rewards (BCO, Jung et al., 2024): the trainer keeps a
:class:`RewardMean` over the implicit rewards of all earlier steps (saved with training
checkpoints), passes its value to :func:`mpo_loss`, and folds the step's rewards in after
the step. Using past batches only keeps the loss of a step a sum of per-pair terms, so
a step can be split into micro-batches and data-parallel shards without changing it.
Default weights (w_p, w_q, w_g) = (0.8, 0.2, 1.0) as in the report.

All functions take per-sequence summed log-probs ``[N]`` (response tokens only) and are
pure; :func:`mpo_loss` returns the batch mean and :func:`mpo_pair_losses` the per-pair
terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MPOLossConfig:
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
        return self.update_sum(float(rewards.detach().double().sum()), n) if n else self.mean

    def update_sum(self, total: float, n: int) -> float:
        """Folds ``n`` rewards summing to ``total`` (e.g. reduced over ranks) into the mean."""
        if n:
            self.count += n
            self.mean += (total / n - self.mean) * n / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


def implicit_rewards(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """r(y) = beta (log pi(y|x) - log pi_ref(y|x)), per sequence."""
    return beta * (policy_logp - ref_logp)


def preference_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Eq. 3 (DPO) per pair: -log sigma(r(y_c) - r(y_r))."""
    return -F.logsigmoid(reward_chosen - reward_rejected)


def quality_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, delta: float) -> torch.Tensor:
    """Eq. 4 (BCO) per pair: -log sigma(r(y_c) - delta) - log sigma(-(r(y_r) - delta))."""
    return -F.logsigmoid(reward_chosen - delta) - F.logsigmoid(-(reward_rejected - delta))


def generation_loss(policy_logp_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Eq. 5 per pair: -log pi(y_c|x) / |y_c| (the chosen response's per-token NLL)."""
    if (chosen_lengths < 1).any():
        raise ValueError(f"chosen responses need >= 1 token, got lengths {chosen_lengths.tolist()}")
    return -policy_logp_chosen / chosen_lengths.to(policy_logp_chosen.dtype)


class MPOPairLosses(NamedTuple):
    """Per-pair terms ``[N]`` of Eq. 2-5 and the implicit rewards they came from."""

    loss: torch.Tensor
    preference: torch.Tensor
    quality: torch.Tensor
    generation: torch.Tensor
    reward_chosen: torch.Tensor
    reward_rejected: torch.Tensor


def mpo_pair_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    config: MPOLossConfig,
    delta: float,
) -> MPOPairLosses:
    """Eq. 2 for each pair (no mean): the terms a micro-batch of a larger step sums."""
    r_c = implicit_rewards(policy_chosen, ref_chosen, config.beta)
    r_r = implicit_rewards(policy_rejected, ref_rejected, config.beta)
    l_p, l_q = preference_loss(r_c, r_r), quality_loss(r_c, r_r, delta)
    l_g = generation_loss(policy_chosen, chosen_lengths)
    total = config.preference_weight * l_p + config.quality_weight * l_q + config.generation_weight * l_g
    return MPOPairLosses(total, l_p, l_q, l_g, r_c.detach(), r_r.detach())


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
    config: MPOLossConfig,
    delta: float,
) -> MPOLoss:
    """Eq. 2 averaged over a batch of pairs, with BCO's ``delta`` from past batches."""
    terms = mpo_pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, config, delta)
    margin = terms.reward_chosen - terms.reward_rejected
    return MPOLoss(terms.loss.mean(), terms.preference.mean(), terms.quality.mean(), terms.generation.mean(), delta,
                   float((margin > 0).float().mean()), float(margin.mean()))
