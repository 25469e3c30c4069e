"""Mixed Preference Optimization (MPO), the first R1V2 stage (report section 3.2, Eq. 2-5).

MPO (Wang et al., "Enhancing the Reasoning Ability of Multimodal Large Language Models
via Mixed Preference Optimization", 2024) sums three losses over preference pairs
(x, y_c, y_r), with the implicit reward r(y) = beta log(pi(y|x) / pi_ref(y|x)):

    L = w_p L_p + w_q L_q + w_g L_g                                           (Eq. 2)
    L_p = -log sigma(r(y_c) - r(y_r))                    preference, DPO      (Eq. 3)
    L_q = -log sigma(r(y_c) - delta) - log sigma(-(r(y_r) - delta))
                                                         quality, BCO         (Eq. 4)
    L_g = -log pi(y_c|x) / |y_c|                         generation, NLL      (Eq. 5)

Default weights (w_p, w_q, w_g) = (0.8, 0.2, 1.0) are InternVL's MPO recipe, not the R1V2
report's (the report gives no values): InternVL's training scripts pass
``--sigmoid_loss_weight 0.8 --bco_pair_loss_weight 0.2 --rpo_alpha 1`` (InternVL 2.0 /
2.5 / 3.0, internvl_chat/shell/*mpo*/*.sh) and InternVL 3.5 sets ``loss_weights =
[0.8, 0.2, 1.0]`` for TRL's ``sigmoid`` / ``bco_pair`` / ``sft`` losses.

Two choices where InternVL's MPO (TRL's DPOTrainer) and ours can differ are options:

``delta`` (Eq. 4, :func:`bco_delta`; BCO, Jung et al., 2024, is a running mean of rewards):
    ``running_mean`` (ours, default): the mean of every implicit reward (chosen and
    rejected) of all earlier steps. The trainer keeps a :class:`RewardMean` (saved with
    training checkpoints) and folds a step's rewards in after the step, so a step's loss
    is a sum of per-pair terms and splits into micro-batches and data-parallel shards
    without changing.
    ``trl_running_mean``: TRL <= 0.28 (``bco_pair``) folds the current batch's mean reward
    into its ``RunningMoments`` *before* the loss, so delta includes the current batch.
    Here "the batch" is the optimizer step (every pair of every micro-batch and
    data-parallel rank): delta is the mean of all earlier steps' and this step's rewards,
    which the trainer gets from an extra forward-only pass before the step's forward and
    backward. That is TRL's value when its batch is the whole step: gradient accumulation
    1, as in InternVL's 2.x / 3.0 recipes (one pair per GPU, one micro-batch per step), and
    every step the same size (TRL counts a micro-batch's mean once per rank, we count
    every reward). With accumulation TRL updates once per micro-batch, so the later
    micro-batches of its step see the earlier ones: that depends on the layout, which a
    step here does not. TRL's DPOTrainer does not checkpoint the running mean; we do.
    ``zero``: delta = 0, TRL >= 0.29 (``bco_pair`` without a running mean).

NLL normalization (Eq. 5, :func:`generation_loss`):
    ``pair`` (ours, default; Eq. 5 as printed): each pair's -log pi(y_c|x) / |y_c|,
    averaged over the pairs.
    ``token``: TRL's NLL (``rpo_alpha`` / ``sft``), a cross-entropy token mean over the
    batch's chosen tokens, sum(-log pi(y_c|x)) / sum(|y_c|); "the batch" is again the
    optimizer step. Lengths 3 and 50 with NLLs 6 and 25: ``pair`` (2 + 0.5) / 2 = 1.25,
    ``token`` 31 / 53 = 0.585 (the long response dominates). TRL takes its token mean per
    micro-batch, so with InternVL's recipes (one pair per micro-batch) TRL's NLL *is*
    ``pair``; ``token`` is TRL's where one micro-batch holds the step's pairs.

All functions take per-sequence summed log-probs ``[N]`` (response tokens only) and are
pure; :func:`mpo_loss` returns the batch mean and :func:`mpo_pair_losses` the per-pair
terms (whose mean is the batch loss for either option).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F

BCODelta = Literal["running_mean", "trl_running_mean", "zero"]
BCO_DELTAS: tuple[str, ...] = ("running_mean", "trl_running_mean", "zero")
NLLNormalization = Literal["pair", "token"]
NLL_NORMALIZATIONS: tuple[str, ...] = ("pair", "token")


@dataclass(frozen=True)
class MPOLossConfig:
    beta: float = 0.1
    """Scale of the implicit reward r(y) = beta log(pi / pi_ref)."""
    preference_weight: float = 0.8
    """w_p of Eq. 2 (the DPO term, Eq. 3); 0.8 is InternVL's recipe value (module docstring)."""
    quality_weight: float = 0.2
    """w_q of Eq. 2 (the BCO term, Eq. 4); 0.2 is InternVL's recipe value."""
    generation_weight: float = 1.0
    """w_g of Eq. 2 (the chosen response's NLL, Eq. 5); 1.0 is InternVL's recipe value."""
    nll_normalization: NLLNormalization = "pair"
    """Eq. 5's divisor: ``pair`` (each pair's |y_c|) or ``token`` (the batch's token mean)."""

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.nll_normalization not in NLL_NORMALIZATIONS:
            raise ValueError(f"nll_normalization must be one of {', '.join(NLL_NORMALIZATIONS)}, "
                             f"got {self.nll_normalization!r}")


@dataclass
class RewardMean:
    """The running mean of implicit rewards that BCO's delta is made from (Eq. 4)."""

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


def bco_delta(mode: BCODelta, past: RewardMean, step_sum: float = 0.0, step_count: int = 0) -> float:
    """Eq. 4's delta for a step, given ``past`` (the rewards of all earlier steps; not changed)
    and, for ``trl_running_mean``, the sum and count of this step's rewards (module docstring)."""
    if mode == "running_mean":
        return past.mean
    if mode == "trl_running_mean":
        if step_count < 1:
            raise ValueError("trl_running_mean needs the step's rewards (step_count >= 1)")
        return RewardMean(past.mean, past.count).update_sum(step_sum, step_count)
    if mode == "zero":
        return 0.0
    raise ValueError(f"bco_delta must be one of {', '.join(BCO_DELTAS)}, got {mode!r}")


def implicit_rewards(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """r(y) = beta (log pi(y|x) - log pi_ref(y|x)), per sequence."""
    return beta * (policy_logp - ref_logp)


def preference_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Eq. 3 (DPO) per pair: -log sigma(r(y_c) - r(y_r))."""
    return -F.logsigmoid(reward_chosen - reward_rejected)


def quality_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, delta: float) -> torch.Tensor:
    """Eq. 4 (BCO) per pair: -log sigma(r(y_c) - delta) - log sigma(-(r(y_r) - delta))."""
    return -F.logsigmoid(reward_chosen - delta) - F.logsigmoid(-(reward_rejected - delta))


def generation_loss(policy_logp_chosen: torch.Tensor, chosen_lengths: torch.Tensor,
                    normalization: NLLNormalization = "pair",
                    mean_chosen_length: Optional[float] = None) -> torch.Tensor:
    """Eq. 5 per pair, whose mean over the batch is the NLL term:

    ``pair``: -log pi(y_c|x) / |y_c| (Eq. 5 as printed);
    ``token``: -log pi(y_c|x) / mean_batch |y_c|, so the mean over the batch's pairs is
    sum(-log pi(y_c|x)) / sum(|y_c|), TRL's token mean. ``mean_chosen_length``: that mean
    over the whole batch when these pairs are only part of it (a micro-batch of a step);
    None: these pairs are the batch."""
    if (chosen_lengths < 1).any():
        raise ValueError(f"chosen responses need >= 1 token, got lengths {chosen_lengths.tolist()}")
    nll = -policy_logp_chosen
    if normalization == "pair":
        return nll / chosen_lengths.to(nll.dtype)
    if normalization != "token":
        raise ValueError(f"nll_normalization must be one of {', '.join(NLL_NORMALIZATIONS)}, got {normalization!r}")
    if mean_chosen_length is None:
        mean_chosen_length = float(chosen_lengths.double().mean())
    if not mean_chosen_length >= 1:  # a mean of lengths >= 1; also rejects NaN
        raise ValueError(f"mean_chosen_length must be >= 1, got {mean_chosen_length}")
    return nll / mean_chosen_length


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
    mean_chosen_length: Optional[float] = None,
) -> MPOPairLosses:
    """Eq. 2 for each pair (no mean): the terms a micro-batch of a larger step sums.
    ``mean_chosen_length``: with ``nll_normalization=token``, the step's mean chosen length
    (see :func:`generation_loss`)."""
    r_c = implicit_rewards(policy_chosen, ref_chosen, config.beta)
    r_r = implicit_rewards(policy_rejected, ref_rejected, config.beta)
    l_p, l_q = preference_loss(r_c, r_r), quality_loss(r_c, r_r, delta)
    l_g = generation_loss(policy_chosen, chosen_lengths, config.nll_normalization, mean_chosen_length)
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
    """Eq. 2 averaged over a batch of pairs, with BCO's ``delta`` from :func:`bco_delta`."""
    terms = mpo_pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, config, delta)
    margin = terms.reward_chosen - terms.reward_rejected
    return MPOLoss(terms.loss.mean(), terms.preference.mean(), terms.quality.mean(), terms.generation.mean(), delta,
                   float((margin > 0).float().mean()), float(margin.mean()))
