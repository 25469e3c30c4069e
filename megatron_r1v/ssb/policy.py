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
(E + r) / B, reaching rho whenever the buffer holds enough groups.

Layout independence (a run resumed at another DP size trains on the same batch): the r
zero groups that go are those latest in the step's global prompt order (each fresh group's
position, ``PromptLoader.next_share``), whichever ranks hold them; the draw selects the same
groups at any sharding (:mod:`.buffer`). Zero groups still count in the loss (its
normalizers, a KL term), so which ones go matters. Balance is then restored by placement,
not by choice: the drawn groups are placed on the ranks with the smallest batches
(:func:`place_reused`), and a group placed away from the rank that holds it is sent there
(a few arrays per group), so per-rank batches differ by at most one group where the buffer
allows.

Order within a step: age out, draw (the buffer holds only earlier steps' groups, so a
fresh group is never in the batch twice), train, then :meth:`SelectiveSampleBuffer.insert`
the step's fresh groups once their behaviour log-probs are known. Drawn groups stay in
the buffer (see :mod:`.buffer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch.distributed as dist

from megatron_r1v.config import RewardConfig, SSBConfig
from megatron_r1v.validation import check_ssb_config

from .buffer import Draw, SelectiveSampleBuffer, SSBGroup, all_gather_int64, group_is_effective, group_rank_size

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
    """The drawn buffered groups this rank trains (:func:`place_reused`), in global draw order."""
    stats: TopUpStats


def reuse_count(fresh: int, effective: int, buffered: int, target_ratio: float) -> int:
    """r = clip(ceil(rho * B) - E, 0, min(B - E, buffered)) of the module docstring."""
    wanted = math.ceil(target_ratio * fresh - _RATIO_SLACK) - effective
    return max(0, min(wanted, fresh - effective, buffered))


def latest_positions(n_drop: int, zero_positions: Sequence[int], group: Optional[dist.ProcessGroup]) -> set[int]:
    """The ``n_drop`` largest positions among every rank's ``zero_positions`` (the step's
    global order of its ineffective fresh groups), on every rank. Collective: each rank sends
    its ``n_drop`` largest (padded with -1): the global largest are among them."""
    mine = sorted(zero_positions, reverse=True)[:n_drop]
    gathered = all_gather_int64(np.array(mine + [-1] * (n_drop - len(mine))), group).reshape(-1)
    candidates = sorted((int(p) for p in gathered if p >= 0), reverse=True)
    if len(candidates) < n_drop:
        raise ValueError(f"cannot drop {n_drop} ineffective groups, only {len(candidates)} exist")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"fresh groups share positions in the step's order: {sorted(candidates)}")
    return set(candidates[:n_drop])


def place_reused(sizes: Sequence[int], owners: Sequence[int]) -> list[int]:
    """The rank that trains each drawn group (in draw order): the one with the smallest batch so
    far (``sizes``: each rank's fresh groups kept), ties to the group's holder (``owners``), then
    the lowest rank. Greedy one at a time, which minimizes the largest batch."""
    size = list(sizes)
    placed = []
    for owner in owners:
        smallest = min(size)
        rank = owner if size[owner] == smallest else size.index(smallest)
        size[rank] += 1
        placed.append(rank)
    return placed


def exchange_reused(drawn: Draw, placed: Sequence[int], rank: int, group: Optional[dist.ProcessGroup]
                    ) -> list[SSBGroup]:
    """This rank's part of the draw after :func:`place_reused`, in draw order: the groups it
    holds and keeps, and those other ranks send it (one all_gather_object, only when a group
    moves; the decision is the same on every rank). Every rank receives every moved group (a
    few of them per step, ~1 MB each at 16k-token responses); a point-to-point send to the one
    rank that trains it is the upgrade if that ever shows in a profile."""
    held = {grp.uid: grp for grp in drawn.groups}
    moving = [j for j, (owner, to) in enumerate(zip(drawn.owners, placed)) if owner != to]
    if moving:
        _, world = group_rank_size(group)
        outgoing = [held[drawn.uids[j]] for j in moving if drawn.owners[j] == rank]
        received: list = [None] * world
        dist.all_gather_object(received, outgoing, group=group)
        held.update((grp.uid, grp) for part in received for grp in part)
    return [held[uid] for uid, to in zip(drawn.uids, placed) if to == rank]


def plan_batch(
    buffer: SelectiveSampleBuffer,
    fresh_advantages: Sequence[Sequence[float] | np.ndarray],
    step: int,
    group: Optional[dist.ProcessGroup] = None,
    positions: Optional[Sequence[int]] = None,
) -> BatchPlan:
    """Ages the buffer out, draws the top-up over all DP ranks and plans this rank's batch.

    ``fresh_advantages`` holds this rank's fresh groups' A_i ([G] each), computed with the
    effective-group criterion (zero for ineffective groups: module docstring); ``positions``
    their places in the step's global order, distinct over the ranks (None: the loader's
    round-robin share, index * world + rank). Collective over ``group`` (all_gathers of a few
    integers, the draw, and the groups that move to another rank); every rank calls it.
    """
    rank, world = group_rank_size(group)
    n_local = len(fresh_advantages)
    positions = list(range(rank, n_local * world, world)) if positions is None else [int(p) for p in positions]
    if len(positions) != n_local:
        raise ValueError(f"{n_local} fresh groups but {len(positions)} positions")
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
        reused_samples = sum(drawn.n_samples)
        dropped_positions = latest_positions(n_reuse, [positions[i] for i in zero_local], group)
        drop_local = [i for i in zero_local if positions[i] in dropped_positions]
        kept = all_gather_int64(np.array([n_local - len(drop_local)]), group)[:, 0].tolist()
        reused = exchange_reused(drawn, place_reused(kept, drawn.owners), rank, group)
    dropped = set(drop_local)
    stats = TopUpStats(
        fresh_groups=fresh, fresh_effective=effective, reused_groups=n_reuse,
        reused_samples=reused_samples, buffer_size=buffered, aged_out=sum(aged_r), target_ratio=ratio,
    )
    return BatchPlan(
        keep_fresh=[i for i in range(n_local) if i not in dropped],
        drop_fresh=drop_local, reused=reused, stats=stats,
    )
