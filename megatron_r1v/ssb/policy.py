"""The SSB batch policy: replace ineffective groups of a step with buffered ones.

Skywork R1V2 (arXiv 2504.16656, section 3.3) uses the Selective Sample Buffer to keep
the share of effective (non-zero-advantage) samples in each policy update high as the
fresh rollouts' share falls. A group is effective when its rewards pass the criterion of
``losses.grpo.effective_groups`` at ``ssb.min_reward_std`` (:func:`resolve_min_reward_std`
turns ``auto`` into a number); Eq. 6 gives every other group zero advantages, so here,
as in the buffer, effective means some A_i != 0 (``buffer.group_is_effective``). The rule
implemented here, with B the step's fresh groups over all DP ranks, E of them effective
and rho = ``ssb.target_effective_ratio``:

    reuse r = clip(ceil(rho * B) - E, 0, min(B - E, groups in the buffer))

buffered groups, drawn by |A| (:meth:`SelectiveSampleBuffer.draw`), each replacing one
ineffective fresh group. Ineffective groups carry no policy gradient (A = 0 in Eq. 8),
so the batch keeps its size B and gains r effective groups: the batch ratio is
(E + r) / B, reaching rho whenever the buffer holds enough groups. Which zero groups go
is chosen to even out the per-rank batch sizes (a rank that contributes buffered groups
drops its own zero groups first).

Order within a step: age out, draw (the buffer holds only earlier steps' groups, so a
fresh group is never in the batch twice), train, then :meth:`SelectiveSampleBuffer.insert`
the step's fresh groups once their behaviour log-probs are known. Drawn groups stay in
the buffer (see :mod:`.buffer`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch.distributed as dist

from megatron_r1v.config import RewardConfig, SSBConfig
from megatron_r1v.validation import check_ssb_config

from .buffer import SelectiveSampleBuffer, SSBGroup, all_gather_int64, group_is_effective, group_rank_size

# rho * B is compared with integers: 0.7 * 10 = 7.000000000000001 must not ask for 8.
_RATIO_SLACK = 1e-9

AUTO_RM_NOISE_LOGITS = 0.2
"""``ssb.min_reward_std=auto`` with a continuous reward-model term: the score spread (std,
in logits of the reward model) below which a group's differences are taken for noise."""
CALIBRATION_SLOPE = {"none": 1.0, "clip": 1.0, "sigmoid": 0.25, "step": 0.0}
"""The steepest slope of each calibration c_t (``rewards.hybrid``): logits -> reward units.
``step`` is 0: its values differ by the whole weight or not at all, so no noise floor."""


def resolve_min_reward_std(ssb: SSBConfig, reward: RewardConfig, group_size: int) -> float:
    """``ssb.min_reward_std`` as a number, in units of the total reward of Eq. 7.

    A number is returned as it is. ``auto`` (reasoning in ``SSBConfig.min_reward_std``):
    0 for a discrete reward (keeps exactly-flat as the only ineffective case); else
    |w_theta| * slope(c_t) * AUTO_RM_NOISE_LOGITS, at most half of w / sqrt(G), the std
    of a group of G where one response differs from the rest by the smallest non-zero
    rule / format weight w (unbiased variance of one w among G - 1 zeros: w^2 / G).
    """
    check_ssb_config(ssb)
    if group_size < 2:
        raise ValueError(f"a GRPO group needs >= 2 responses (rollout.n_samples), got {group_size}")
    if ssb.min_reward_std != "auto":
        return float(ssb.min_reward_std)
    if reward.model_calibration not in CALIBRATION_SLOPE:
        raise ValueError(f"reward.model_calibration: {reward.model_calibration!r} is not one of "
                         f"{', '.join(CALIBRATION_SLOPE)}")
    floor = abs(reward.model_weight) * CALIBRATION_SLOPE[reward.model_calibration] * AUTO_RM_NOISE_LOGITS
    verdicts = [abs(w) for w in (reward.rule_weight, reward.format_weight) if w != 0]
    if floor > 0 and verdicts:
        floor = min(floor, 0.5 * min(verdicts) / math.sqrt(group_size))
    return float(floor)


@dataclass(frozen=True)
class TopUpStats:
    """One step's SSB numbers over all DP ranks (identical on every rank)."""

    fresh_groups: int
    """B: groups generated this step."""
    fresh_effective: int
    """E: effective fresh groups (non-zero advantage: they passed ``ssb.min_reward_std``)."""
    reused_groups: int
    """r: buffered groups put in the batch (each replacing an ineffective fresh group)."""
    reused_samples: int
    """Responses in the reused groups."""
    buffer_size: int
    """Groups in the buffer when the batch was drawn (after aging out, before this step's inserts)."""
    aged_out: int
    """Groups dropped for age at this step."""
    target_ratio: float

    @property
    def batch_groups(self) -> int:
        return self.fresh_groups

    @property
    def batch_effective(self) -> int:
        return self.fresh_effective + self.reused_groups

    @property
    def effective_ratio_fresh(self) -> float:
        """E / B (0 for an empty step)."""
        return self.fresh_effective / self.fresh_groups if self.fresh_groups else 0.0

    @property
    def effective_ratio_batch(self) -> float:
        """(E + r) / B after the top-up (0 for an empty step)."""
        return self.batch_effective / self.batch_groups if self.batch_groups else 0.0

    def metrics(self) -> dict[str, float]:
        """The scalars the trainer logs, by TensorBoard tag."""
        return {
            "ssb/effective_ratio_fresh": self.effective_ratio_fresh,
            "ssb/effective_ratio_batch": self.effective_ratio_batch,
            "ssb/size": float(self.buffer_size),
            "ssb/reused_groups": float(self.reused_groups),
            "ssb/reused_samples": float(self.reused_samples),
            "ssb/aged_out": float(self.aged_out),
        }


@dataclass
class BatchPlan:
    """This rank's part of a step's batch."""

    keep_fresh: list[int]
    """Indices of this rank's fresh groups that stay in the batch (in input order)."""
    drop_fresh: list[int]
    """Indices of this rank's ineffective (zero-advantage) fresh groups replaced by buffered ones."""
    reused: list[SSBGroup]
    """This rank's buffered groups drawn for the batch (in global draw order)."""
    stats: TopUpStats


def reuse_count(fresh: int, effective: int, buffered: int, target_ratio: float) -> int:
    """r = clip(ceil(rho * B) - E, 0, min(B - E, buffered)) of the module docstring."""
    wanted = math.ceil(target_ratio * fresh - _RATIO_SLACK) - effective
    return max(0, min(wanted, fresh - effective, buffered))


def balance_drops(n_drop: int, fresh: Sequence[int], zero: Sequence[int], reused: Sequence[int]) -> list[int]:
    """Ineffective groups each rank drops, ``n_drop`` in all, evening out batch sizes.

    Rank r ends with fresh[r] - drops[r] + reused[r] groups and can drop at most zero[r].
    Greedy: one drop at a time from the rank with the largest current batch (ties:
    lowest rank), which minimizes the largest batch.
    """
    if n_drop > sum(zero):
        raise ValueError(f"cannot drop {n_drop} ineffective groups, only {sum(zero)} exist")
    size = [f + r for f, r in zip(fresh, reused)]
    drops = [0] * len(size)
    heap = [(-size[r], r) for r in range(len(size)) if zero[r] > 0]
    heapq.heapify(heap)
    for _ in range(n_drop):
        _, r = heapq.heappop(heap)
        drops[r] += 1
        size[r] -= 1
        if drops[r] < zero[r]:
            heapq.heappush(heap, (-size[r], r))
    return drops


def plan_batch(
    buffer: SelectiveSampleBuffer,
    fresh_advantages: Sequence[Sequence[float] | np.ndarray],
    step: int,
    group: Optional[dist.ProcessGroup] = None,
) -> BatchPlan:
    """Ages the buffer out, draws the top-up over all DP ranks and plans this rank's batch.

    ``fresh_advantages`` holds this rank's fresh groups' A_i ([G] each), computed with the
    effective-group criterion (zero for ineffective groups: module docstring). Collective
    over ``group`` (two all_gathers of a few integers each, then the draw); every rank calls it.
    """
    rank, world = group_rank_size(group)
    n_local = len(fresh_advantages)
    zero_local = [i for i, adv in enumerate(fresh_advantages) if not group_is_effective(adv)]
    aged = buffer.age_out(step)
    counts = all_gather_int64(np.array([n_local, n_local - len(zero_local), len(buffer), aged]), group)
    fresh_r, effective_r, buffered_r, aged_r = (counts[:, i].tolist() for i in range(4))
    fresh, effective, buffered = sum(fresh_r), sum(effective_r), sum(buffered_r)
    ratio = buffer.config.target_effective_ratio if buffer.config.enabled else 0.0
    n_reuse = reuse_count(fresh, effective, buffered, ratio)

    reused: list[SSBGroup] = []
    reused_samples = 0
    drop_local: list[int] = []
    if n_reuse:  # identical on every rank, so all of them draw or none does
        drawn = buffer.draw(n_reuse, group)
        assert len(drawn.uids) == n_reuse, (len(drawn.uids), n_reuse)
        reused, reused_samples = drawn.groups, sum(drawn.n_samples)
        zero_r = [f - e for f, e in zip(fresh_r, effective_r)]
        drops = balance_drops(n_reuse, fresh_r, zero_r, drawn.count_by_rank(world))
        # The last zero groups go: any choice is valid, this one is deterministic.
        drop_local = zero_local[len(zero_local) - drops[rank]:] if drops[rank] else []
    dropped = set(drop_local)
    stats = TopUpStats(
        fresh_groups=fresh, fresh_effective=effective, reused_groups=n_reuse,
        reused_samples=reused_samples, buffer_size=buffered, aged_out=sum(aged_r), target_ratio=ratio,
    )
    return BatchPlan(
        keep_fresh=[i for i in range(n_local) if i not in dropped],
        drop_fresh=drop_local, reused=reused, stats=stats,
    )
