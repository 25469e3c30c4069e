"""The Selective Sample Buffer store: groups, priorities, eviction, and the weighted draw.

Skywork R1V2 (arXiv 2504.16656, section 3.3, "Selective Sample Buffer") observes that
GRPO's group-relative advantage (Eq. 6) vanishes when all responses to a prompt get the
same reward, and that the share of such zero-signal groups grows as training proceeds
(the report's "vanishing advantages": effective samples fall from about 60% to under
40%). The SSB caches groups with non-zero advantage and reintroduces them in later
policy updates, sampled with probability proportional to the magnitude of their
advantage. This module is the store; :mod:`.policy` decides how many to reintroduce.

Definitions used here (the report leaves them open):

- A group's priority is the mean over its G responses of |A_i|; only effective groups,
  those with priority > 0 (:func:`group_is_effective`), are stored. The effective-group
  criterion itself (rewards not all equal, std >= ``ssb.min_reward_std``) is applied
  once, where the advantages are computed (``losses.grpo.group_advantages``), which
  zeroes the advantages of every group that fails it; so the insert filter here, the
  top-up and the ``ssb/effective_ratio_*`` metrics (:mod:`.policy`) all use that one
  criterion. :meth:`SelectiveSampleBuffer.drop_ineffective` re-applies it to stored
  groups (a run resumed under a stricter ``ssb.min_reward_std``).
- A draw of k groups is weighted sampling without replacement (draw one group with
  probability priority / remaining total, remove it, repeat).
- Groups older than ``max_age`` steps are dropped; past ``capacity`` groups over all DP
  ranks, the lowest priority is evicted (ties: the oldest, then the smallest uid), the same
  groups whatever the sharding (:meth:`SelectiveSampleBuffer.evict_to`).
- A drawn group stays in the buffer and may be drawn again at a later step (never twice
  in one draw) until it ages out, is evicted, or reaches ``max_reuse`` draws.

The draw is the Efraimidis-Spirakis exponential race (Information Processing Letters
97(5), 2006): group i gets the key E_i = -ln(u_i) / w_i with u_i uniform in (0, 1), and
the k smallest keys, in increasing order, are the draw. E_i ~ Exp(w_i) independently;
the minimum of independent exponentials is group i with probability w_i / sum(w), and
by memorylessness the others' excess over that minimum are again independent Exp(w_j),
so the order of the keys is exactly the sequential draw without replacement.

Why this scheme rather than a shared sequential generator: u_i comes from a
counter-based hash of (seed, draw counter, the group's content-derived uid), not from
where the group lives. A draw sharded over data-parallel ranks therefore selects the
very same groups, in the same order, as a single process holding their union, whatever
the sharding (also after re-sharding a checkpoint to another DP size). Each rank sends
only its k smallest keys (k floats + uids, one all_gather), because the global k
smallest are among the union of each rank's k smallest. The random state is just
(seed, draw counter), saved with the store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_r1v.config import SSBConfig
from megatron_r1v.losses.grpo import effective_groups
from megatron_r1v.platform import collective_device
from megatron_r1v.validation import check_ssb_config

_UINT64 = np.uint64
_MASK64 = (1 << 64) - 1
_INT32_MAX = np.iinfo(np.int32).max


def group_priority(advantages: Sequence[float] | np.ndarray) -> float:
    """mean_i |A_i| of one group, in float64 (the SSB's sampling weight)."""
    adv = np.asarray(advantages, dtype=np.float32)
    return float(np.abs(adv.astype(np.float64)).mean()) if adv.size else 0.0


def group_is_effective(advantages: Sequence[float] | np.ndarray) -> bool:
    """Whether a group carries a learning signal: some A_i != 0. Advantages computed with
    the effective-group criterion are all zero exactly for the groups that fail it."""
    return group_priority(advantages) > 0.0


@dataclass(eq=False)
class SSBGroup:
    """The G responses to one prompt, as generated at ``step``; treated as immutable.

    ``loss_mask[i]`` and ``old_logprobs[i]`` cover the last ``len(loss_mask[i])`` tokens
    of ``token_ids[i]`` (the response); the tokens before them are the prompt.
    """

    prompt_id: str
    step: int
    """Training step whose rollout produced the group."""
    token_ids: list[np.ndarray]
    """G arrays [L_i] int32: prompt + response tokens (converted; ids must fit int32)."""
    loss_mask: list[np.ndarray]
    """G arrays [R_i] bool over the response tokens."""
    old_logprobs: list[np.ndarray]
    """G arrays [R_i] float32: the behaviour policy's log-probs of the response tokens."""
    advantages: np.ndarray
    """[G] float32: A_i of Eq. 6."""
    rewards: dict[str, np.ndarray] = field(default_factory=dict)
    """Reward parts by name (e.g. total, rule, format, model): [G] float64 each."""
    image_paths: tuple[str, ...] = ()
    """The prompt's images, by reference (paths as in the prompt record), not pixels."""
    uid: int = field(init=False)
    """63-bit content hash: the stable key of draws, tie-breaks and re-sharding."""
    priority: float = field(init=False)

    def __post_init__(self) -> None:
        where = f"SSB group of prompt {self.prompt_id!r} (step {self.step})"
        g = len(self.token_ids)
        if g < 1:
            raise ValueError(f"{where}: needs at least one response")
        if len(self.loss_mask) != g or len(self.old_logprobs) != g:
            raise ValueError(f"{where}: {g} token arrays but {len(self.loss_mask)} loss masks "
                             f"and {len(self.old_logprobs)} log-prob arrays")
        if int(self.step) < 0:
            raise ValueError(f"{where}: step must be >= 0")
        self.step = int(self.step)
        self.token_ids = [_as_tokens(t, where, i) for i, t in enumerate(self.token_ids)]
        self.loss_mask = [np.asarray(m).astype(np.bool_).reshape(-1) for m in self.loss_mask]
        # np.array copies: the buffer must not share memory with the caller's arrays.
        self.old_logprobs = [np.array(lp, dtype=np.float32).reshape(-1) for lp in self.old_logprobs]
        for i, (tok, mask, lp) in enumerate(zip(self.token_ids, self.loss_mask, self.old_logprobs)):
            if mask.shape != lp.shape or mask.size > tok.size:
                raise ValueError(f"{where}, response {i}: loss_mask {mask.shape} and old_logprobs {lp.shape} "
                                 f"must have one length, at most the {tok.size} tokens")
        self.advantages = np.array(self.advantages, dtype=np.float32).reshape(-1)
        if self.advantages.shape != (g,) or not np.isfinite(self.advantages).all():
            raise ValueError(f"{where}: advantages must be {g} finite values, got {self.advantages.tolist()}")
        rewards = {}
        for name, values in self.rewards.items():
            arr = np.array(values, dtype=np.float64).reshape(-1)
            if arr.shape != (g,) or not np.isfinite(arr).all():
                raise ValueError(f"{where}: reward {name!r} must be {g} finite values, got {arr.tolist()}")
            rewards[str(name)] = arr
        self.rewards = rewards
        self.image_paths = tuple(str(p) for p in self.image_paths)
        self.priority = group_priority(self.advantages)
        self.uid = _content_uid(self)

    @property
    def n_samples(self) -> int:
        return len(self.token_ids)

    def same_content(self, other: "SSBGroup") -> bool:
        """Exact equality of every field (values and dtypes)."""
        def same(a: np.ndarray, b: np.ndarray) -> bool:
            return a.dtype == b.dtype and np.array_equal(a, b)

        return (
            self.uid == other.uid and self.prompt_id == other.prompt_id and self.step == other.step
            and self.image_paths == other.image_paths
            and same(self.advantages, other.advantages) and self.rewards.keys() == other.rewards.keys()
            and all(same(v, other.rewards[k]) for k, v in self.rewards.items())
            and len(self.token_ids) == len(other.token_ids)
            and all(map(same, self.token_ids, other.token_ids))
            and all(map(same, self.loss_mask, other.loss_mask))
            and all(map(same, self.old_logprobs, other.old_logprobs))
        )


def _as_tokens(tokens, where: str, i: int) -> np.ndarray:
    arr = np.asarray(tokens).reshape(-1)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{where}, response {i}: token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX):
        raise ValueError(f"{where}, response {i}: token ids must be in [0, 2^31), got {arr.min()}..{arr.max()}")
    return arr.astype(np.int32)


def _content_uid(group: SSBGroup) -> int:
    # A content hash (not an insertion counter) so that the key, and with it every
    # random number of a draw, does not depend on which rank or buffer holds the group.
    h = hashlib.blake2b(digest_size=8, person=b"r1v-ssb-uid1")
    h.update(group.prompt_id.encode("utf-8") + b"\0")
    h.update(np.array([group.step, group.n_samples], dtype="<i8").tobytes())
    for tok, lp in zip(group.token_ids, group.old_logprobs):
        h.update(np.array([tok.size, lp.size], dtype="<i8").tobytes())
        h.update(tok.astype("<i4").tobytes())
    h.update(group.advantages.astype("<f4").tobytes())
    return int.from_bytes(h.digest(), "little") >> 1  # non-negative int64; -1 marks padding


def group_checksum(group: SSBGroup, times_drawn: int) -> int:
    """63-bit hash of everything the store keeps of a group: every array (tokens, loss masks,
    old log-probs, advantages, rewards), the prompt id, step, image paths and ``times_drawn``.

    The store writes it beside each group and checks it on load, so damage to any stored
    array (a lost zarr chunk reads back as zeros) is an error, not a different loss. The
    ``uid`` stays the narrower content key of draws (changing it would change every draw)."""
    h = hashlib.blake2b(digest_size=8, person=b"r1v-ssb-sum1")
    h.update(np.array([group.uid, group.step, group.n_samples, times_drawn], dtype="<i8").tobytes())
    h.update("\0".join((group.prompt_id, *group.image_paths)).encode("utf-8") + b"\1")
    for tok, mask, lp in zip(group.token_ids, group.loss_mask, group.old_logprobs):
        h.update(np.array([tok.size, mask.size], dtype="<i8").tobytes())
        h.update(tok.astype("<i4").tobytes() + mask.astype(np.uint8).tobytes() + lp.astype("<f4").tobytes())
    h.update(group.advantages.astype("<f4").tobytes())
    for key in sorted(group.rewards):
        h.update(key.encode("utf-8") + b"\0" + group.rewards[key].astype("<f8").tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer (Steele et al., 2014), elementwise on uint64 arrays."""
    with np.errstate(over="ignore"):
        z = x + _UINT64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _UINT64(30))) * _UINT64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _UINT64(27))) * _UINT64(0x94D049BB133111EB)
    return z ^ (z >> _UINT64(31))


def exponential_keys(seed: int, counter: int, uids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """E_i = -ln(u_i) / w_i [N] float64, u_i a counter-based uniform of (seed, counter, uid_i)."""
    stream = _splitmix64(_splitmix64(np.array([seed & _MASK64], dtype=_UINT64)) ^ _UINT64(counter & _MASK64))
    bits = _splitmix64(_splitmix64(np.asarray(uids, dtype=np.int64).astype(_UINT64) ^ stream))
    # 53 random bits, centred in their cell: u is never 0 or 1.
    u = ((bits >> _UINT64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return -np.log(u) / np.asarray(weights, dtype=np.float64)


@dataclass
class InsertStats:
    inserted: int
    zero_advantage: int
    """Ineffective groups not stored: all their advantages are 0 (flat rewards, or a reward
    std below ``ssb.min_reward_std``)."""
    duplicates: int
    """Groups not stored because the buffer already holds them (same uid)."""
    evicted: int
    """Stored groups evicted (lowest priority first) to stay within the capacity."""


@dataclass
class Draw:
    """One global draw: every rank sees the global order, and holds its own groups."""

    groups: list[SSBGroup]
    """This rank's selected groups, in the order of the global draw."""
    uids: list[int]
    """uids of all selected groups, in draw order (identical on every rank)."""
    owners: list[int]
    """DP rank holding each selected group."""
    n_samples: list[int]
    """Responses of each selected group."""


def group_rank_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, size) in ``group``; (0, 1) without torch.distributed or with group None."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_int64(values: np.ndarray, group: Optional[dist.ProcessGroup]) -> np.ndarray:
    """[world, *values.shape] int64: every rank's ``values`` (same shape on every rank)."""
    _, world = group_rank_size(group)
    local = np.ascontiguousarray(values, dtype=np.int64)
    if world == 1:
        return local[None]
    device = collective_device(group)
    mine = torch.from_numpy(local).to(device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).cpu().numpy()


class SelectiveSampleBuffer:
    """One data-parallel rank's share of the SSB (the groups its rollouts produced).

    Collective methods (:meth:`draw`, :meth:`insert`, :meth:`evict_to`) take the DP process
    group, or None for a single process; every rank must call them with the same arguments.
    Groups are told apart by ``uid`` on each rank; a group held twice over the ranks (the same
    prompt twice in one step with the very same G responses and advantages: effective groups
    differ in their responses, so practically never) would count twice in the capacity.
    """

    def __init__(self, config: SSBConfig, seed: Optional[int] = None, draw_counter: int = 0):
        check_ssb_config(config)
        self.config = config
        self.seed = config.seed if seed is None else int(seed)
        self.draw_counter = int(draw_counter)
        """Draws made so far; with ``seed``, the whole random state."""
        self._groups: dict[int, SSBGroup] = {}
        # Kept here, not on the group, so one group object may sit in several buffers.
        self._times_drawn: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def snapshot(self) -> tuple:
        """The buffer's state as it is now, cheaply: groups are never changed once stored,
        so copies of the two dicts (references, not arrays) and the draw counter suffice."""
        return self.draw_counter, dict(self._groups), dict(self._times_drawn)

    def restore_snapshot(self, snapshot: tuple) -> None:
        """Puts back the state :meth:`snapshot` returned (a failed step's draws undone)."""
        self.draw_counter, groups, times_drawn = snapshot
        self._groups, self._times_drawn = dict(groups), dict(times_drawn)

    def __contains__(self, uid: int) -> bool:
        return uid in self._groups

    @property
    def groups(self) -> list[SSBGroup]:
        """Stored groups, ordered by uid (a canonical order, independent of history)."""
        return [self._groups[u] for u in sorted(self._groups)]

    def times_drawn(self, uid: int) -> int:
        """How many draws of this buffer have selected the group (part of the saved state)."""
        return self._times_drawn[uid]

    def total_weight(self) -> float:
        return float(sum(g.priority for g in self._groups.values()))

    def insert(self, groups: Iterable[SSBGroup], group: Optional[dist.ProcessGroup] = None) -> InsertStats:
        """Stores the effective groups (priority > 0), then evicts down to the capacity over the
        ranks of ``group`` (:meth:`evict_to`; collective: every rank calls it, with or without groups)."""
        stats = InsertStats(0, 0, 0, 0)
        for grp in groups:
            if not group_is_effective(grp.advantages):
                stats.zero_advantage += 1
            elif grp.uid in self._groups:
                stats.duplicates += 1
            else:
                self._groups[grp.uid] = grp
                self._times_drawn[grp.uid] = 0
                stats.inserted += 1
        stats.evicted = self.evict_to(self.config.capacity, group)
        return stats

    def evict_to(self, capacity: int, group: Optional[dist.ProcessGroup] = None) -> int:
        """Drops the lowest-priority groups (ties: oldest, then smallest uid) beyond ``capacity``
        groups over all ranks of ``group`` (None: this buffer alone); returns how many this rank
        dropped. The same groups go whatever the sharding. Collective: an all_gather of the
        sizes, and when over capacity one of each rank's ``excess`` lowest (priority, step, uid)."""
        _, world = group_rank_size(group)
        sizes = all_gather_int64(np.array([len(self._groups)]), group)
        excess = int(sizes.sum()) - capacity  # the same on every rank
        if excess <= 0:
            return 0
        lowest = sorted(self._groups.values(), key=lambda g: (g.priority, g.step, g.uid))[:excess]
        if world > 1:  # the global lowest are among each rank's own lowest
            payload = np.full((3, excess), -1, dtype=np.int64)
            payload[0, : len(lowest)] = np.array([g.priority for g in lowest], dtype=np.float64).view(np.int64)
            payload[1, : len(lowest)] = [g.step for g in lowest]
            payload[2, : len(lowest)] = [g.uid for g in lowest]
            gathered = all_gather_int64(payload, group).transpose(0, 2, 1).reshape(-1, 3)
            candidates = sorted((float(np.int64(c[0]).view(np.float64)), int(c[1]), int(c[2]))
                                for c in gathered if c[2] >= 0)
            chosen = {uid for _, _, uid in candidates[:excess]}
            lowest = [g for g in lowest if g.uid in chosen]
        for grp in lowest:
            self._remove(grp.uid)
        return len(lowest)

    def _remove(self, uid: int) -> None:
        del self._groups[uid]
        del self._times_drawn[uid]

    def drop_ineffective(self, min_reward_std: float) -> int:
        """Drops stored groups whose total rewards fail the effective-group criterion at
        ``min_reward_std`` (``losses.grpo.effective_groups``); returns how many.

        Groups were admitted under the criterion in force when they were inserted. After a
        resume with a larger ``ssb.min_reward_std`` this removes those that no longer pass,
        which would otherwise be drawn with their std-amplified advantages; under the same
        criterion it removes nothing. Groups without a ``total`` reward are kept.
        """
        stale = [u for u, g in self._groups.items()
                 if "total" in g.rewards and g.n_samples >= 2
                 and not bool(effective_groups(torch.from_numpy(g.rewards["total"][None]), min_reward_std)[0])]
        for uid in stale:
            self._remove(uid)
        return len(stale)

    def age_out(self, step: int) -> int:
        """Drops groups with ``step - group.step > max_age``; returns how many."""
        old = [u for u, g in self._groups.items() if step - g.step > self.config.max_age]
        for uid in old:
            self._remove(uid)
        return len(old)

    def draw(self, k: int, group: Optional[dist.ProcessGroup] = None) -> Draw:
        """Draws min(k, global size) groups over all ranks of ``group`` by priority, without replacement.

        Collective: one all_gather of each rank's k smallest keys. Advances the draw
        counter (on every rank alike) and counts the draw in :meth:`times_drawn` of
        each selected group; groups that reach ``max_reuse`` draws leave the buffer.
        """
        if k < 0:
            raise ValueError(f"cannot draw {k} groups")
        rank, world = group_rank_size(group)
        if k == 0:  # k is the same on every rank, so all of them skip the collective
            self.draw_counter += 1
            return Draw(groups=[], uids=[], owners=[], n_samples=[])
        stored = list(self._groups.values())
        uids = np.array([g.uid for g in stored], dtype=np.int64)
        weights = np.array([g.priority for g in stored], dtype=np.float64)
        keys = exponential_keys(self.seed, self.draw_counter, uids, weights)
        self.draw_counter += 1
        local = np.lexsort((uids, keys))[:k]  # by key, ties by uid
        # [3, k] int64 per rank: key bits, uid (-1 pads), responses.
        payload = np.full((3, k), -1, dtype=np.int64)
        payload[0, : local.size] = keys[local].view(np.int64)
        payload[1, : local.size] = uids[local]
        payload[2, : local.size] = [stored[i].n_samples for i in local]
        gathered = all_gather_int64(payload, group)  # [world, 3, k]
        owner = np.repeat(np.arange(world), k)
        slot = np.tile(np.arange(k), world)
        cand_keys = gathered[:, 0, :].reshape(-1).view(np.float64)
        cand_uids = gathered[:, 1, :].reshape(-1)
        valid = cand_uids >= 0
        order = np.flatnonzero(valid)[np.lexsort((cand_uids[valid], cand_keys[valid]))][:k]
        mine = [stored[local[slot[j]]] for j in order if owner[j] == rank]
        for grp in mine:
            self._times_drawn[grp.uid] += 1
            if self.config.max_reuse and self._times_drawn[grp.uid] >= self.config.max_reuse:
                self._remove(grp.uid)
        return Draw(
            groups=mine,
            uids=cand_uids[order].tolist(),
            owners=owner[order].tolist(),
            n_samples=gathered[:, 2, :].reshape(-1)[order].tolist(),
        )

    def restore(self, groups: Iterable[tuple[SSBGroup, int]]) -> None:
        """Adds (group, times drawn) pairs as loaded from a store, unfiltered: for :mod:`.persist`."""
        for grp, times in groups:
            self._groups[grp.uid] = grp
            self._times_drawn[grp.uid] = int(times)
