"""The records of one GRPO step, from rollout to loss, and the functions between them.

    ScoredGroup (a prompt's G responses: tokens, engine log-probs, reward terms, Eq. 6
    advantages)  -> TrainSample (one response of the batch, fresh or reused from the SSB)
    -> PackedRow (a packed micro-batch with its per-position vectors)  -> the loss;
    per-row vectors come back to samples by index (:func:`per_sample`), and fresh groups
    go into the Selective Sample Buffer with their behaviour log-probs (:func:`fresh_ssb_groups`).

Nothing here talks to other ranks or the model: the trainer (``trainer/grpo.py``) runs
the rollout, the schedules and the reductions.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_r1v.data.loader import PromptItem, PromptLoader
from megatron_r1v.data.packing import PackedMicroBatch, pack_samples
from megatron_r1v.data.template import IGNORE_INDEX, EncodedSample
from megatron_r1v.losses.grpo import group_advantages, truncated_is_weights
from megatron_r1v.losses.kl_reward import kl_shaped_rewards, sequence_kl
from megatron_r1v.ssb import BatchPlan, SSBGroup

REWARD_TERMS = ("total", "rule", "format", "model")


@dataclass
class ScoredGroup:
    """One prompt's rollout: its G responses, the engine's log-probs of their tokens and
    the reward terms of Eq. 7 (the same on every rank of a replica)."""

    response_ids: list[np.ndarray]
    """G arrays [R_i] int64: the response tokens."""
    engine_logprobs: list[np.ndarray]
    """G arrays [R_i] float32: the rollout engine's log-probs of those tokens."""
    rewards: dict[str, np.ndarray]
    """``REWARD_TERMS`` -> [G] float64; GRPO's fresh groups add "overlong" (DAPO's R_length, unweighted)."""
    kl_penalty: Optional[np.ndarray] = None
    """[G] float64 beta sum_t KL_t of each response (``grpo.kl_placement: reward``, losses/kl_reward.py),
    subtracted from the total reward before Eq. 6; None: the KL is in the loss (or off)."""

    def shaped_totals(self) -> np.ndarray:
        """[G] float64: the total rewards Eq. 6 sees, r - beta sum_t KL_t with a ``kl_penalty``."""
        totals = np.asarray(self.rewards["total"], dtype=np.float64)
        return totals if self.kl_penalty is None else kl_shaped_rewards(totals, self.kl_penalty, 1.0)

    def advantages(self, min_reward_std: float = 0.0, std_normalize: bool = True) -> np.ndarray:
        """Eq. 6 over the group's total rewards ([G] float32; shaped by ``kl_penalty`` when set):
        zeros for a group that is flat or whose reward std is below ``min_reward_std`` (the
        resolved ``ssb.min_reward_std``; 0 keeps only the exact-flatness rule);
        ``std_normalize=False``: Dr. GRPO's r - mean (``grpo.advantage_std_normalize``)."""
        totals = torch.tensor(self.shaped_totals()[None], dtype=torch.float64)
        return group_advantages(totals, min_std=min_reward_std, std_normalize=std_normalize)[0].numpy()


@dataclass
class TrainSample:
    """One response of the step's batch, ready to pack."""

    encoded: EncodedSample
    pixels: Optional[torch.Tensor]
    advantage: float
    old_logprobs: Optional[np.ndarray] = None
    """[R] for a response reused from the SSB (its behaviour log-probs); None: computed now."""
    engine_logprobs: Optional[np.ndarray] = None
    """[R] for a fresh response: the engine's log-probs of its tokens."""
    fresh_source: Optional[tuple[int, int]] = None
    """(group, response) index of a fresh response in the step's rollout; None when reused."""

    def target_count(self) -> int:
        """Tokens that carry a loss (at least 1, so a normalization weight is defined)."""
        return max(int((self.encoded.labels != IGNORE_INDEX).sum()), 1)


@dataclass
class PackedRow:
    """One packed micro-batch with its per-position vectors ``[L]`` (aligned with the labels)."""

    packed: PackedMicroBatch
    advantages: torch.Tensor
    weights: torch.Tensor
    stored_logprobs: torch.Tensor
    has_stored: torch.Tensor
    """bool: reused SSB responses, whose old log-probs are ``stored_logprobs``."""
    engine_logprobs: torch.Tensor
    has_engine: torch.Tensor
    """bool: fresh responses' loss positions, whose engine log-probs are ``engine_logprobs``."""


@dataclass
class StepSums:
    """Per-rank sums behind the step's monitoring metrics, summed over ranks by the trainer.

    Reward sums come from one rank per replica (the rollout owner), entropy and engine-gap
    sums from one TP rank of the last stage, so each counts once."""

    reward_total: float = 0.0
    reward_rule: float = 0.0
    reward_format: float = 0.0
    reward_model: float = 0.0
    responses: float = 0.0
    response_tokens: float = 0.0
    entropy_sum: float = 0.0
    entropy_tokens: float = 0.0
    gap_sum: float = 0.0
    """sum over fresh response tokens of |trainer log-prob - engine log-prob|."""
    gap_tokens: float = 0.0
    tis_sum: float = 0.0
    tis_truncated: float = 0.0

    def as_list(self) -> list[float]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> "StepSums":
        return cls(*values)

    def add_rewards(self, groups: Sequence[ScoredGroup]) -> None:
        for term in REWARD_TERMS:  # summed left to right, group by group
            total = sum(sum(group.rewards[term].tolist()) for group in groups)
            setattr(self, f"reward_{term}", getattr(self, f"reward_{term}") + total)
        self.responses += sum(len(group.response_ids) for group in groups)
        self.response_tokens += sum(len(r) for group in groups for r in group.response_ids)


def overlong_sum(groups: Sequence[ScoredGroup]) -> float:
    """Sum of DAPO's R_length (unweighted) over the groups' responses. Not a REWARD_TERMS entry
    (SSB stores keep their keys): a group scored without it (the SSB pool's) adds 0."""
    return sum(sum(g.rewards["overlong"].tolist()) for g in groups if "overlong" in g.rewards)


def kl_penalty_sum(groups: Sequence[ScoredGroup]) -> float:
    """Sum of beta sum_t KL_t over the groups' responses (``grpo.kl_placement: reward``; 0 without)."""
    return sum(sum(g.kl_penalty.tolist()) for g in groups if g.kl_penalty is not None)


def encode_response(sample_id: str, token_ids: torch.Tensor, prompt_len: int, loss_mask: Optional[np.ndarray],
                    tiles: tuple[int, ...]) -> EncodedSample:
    """Prompt + response as a training sample: labels are the next tokens of the response
    (``loss_mask`` false: ignored), the prompt's positions carry no loss."""
    labels = torch.full_like(token_ids, IGNORE_INDEX)
    labels[prompt_len - 1:-1] = token_ids[prompt_len:]
    if loss_mask is not None:
        labels[prompt_len - 1:-1][~torch.from_numpy(loss_mask.astype(bool))] = IGNORE_INDEX
    return EncodedSample(sample_id, token_ids, labels, prompt_len, tiles, 0)


def fresh_samples(items: Sequence[PromptItem], groups: Sequence[ScoredGroup], advantages: Sequence[np.ndarray],
                  keep: Sequence[int]) -> list[TrainSample]:
    """The responses of the fresh groups ``keep`` (indices into ``items`` / ``groups``), in that order."""
    samples = []
    for i in keep:
        item = items[i]
        for j, response in enumerate(groups[i].response_ids):
            ids = torch.cat([item.prompt_ids, torch.from_numpy(response)])
            enc = encode_response(f"{item.record.id}#{j}", ids, len(item.prompt_ids), None, item.tiles_per_image)
            samples.append(TrainSample(enc, item.pixel_values, float(advantages[i][j]),
                                       engine_logprobs=groups[i].engine_logprobs[j], fresh_source=(i, j)))
    return samples


def train_samples(items: Sequence[PromptItem], groups: Sequence[ScoredGroup], advantages: Sequence[np.ndarray],
                  plan: BatchPlan, loader: PromptLoader) -> list[TrainSample]:
    """The step's batch: the responses of the fresh groups the plan keeps, then those of the
    groups it reuses from the SSB (whose prompts are prepared again from their records)."""
    samples = fresh_samples(items, groups, advantages, plan.keep_fresh)
    for grp in plan.reused:
        item = loader.prepare(loader.record(grp.prompt_id))
        if item is None and grp.image_paths:
            continue  # its images went bad since (on_bad_sample=skip has logged it)
        for j, tokens in enumerate(grp.token_ids):
            ids = torch.from_numpy(tokens.astype(np.int64))
            prompt_len = len(tokens) - len(grp.loss_mask[j])
            enc = encode_response(f"{grp.prompt_id}@{grp.step}#{j}", ids, prompt_len, grp.loss_mask[j],
                                  item.tiles_per_image if item else ())
            samples.append(TrainSample(enc, item.pixel_values if item else None, float(grp.advantages[j]),
                                       grp.old_logprobs[j]))
    return samples


def _response_vector(sample: TrainSample, values: Optional[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(``values`` placed at the sample's response label positions [len], where they are)."""
    length, p = len(sample.encoded), sample.encoded.prompt_len
    out, present = torch.zeros(length), torch.zeros(length)
    if values is not None:
        out[p - 1: length - 1] = torch.from_numpy(values.astype(np.float32))
        present[p - 1: length - 1] = 1.0
    return out, present


def pack_rows(samples: Sequence[TrainSample], weights_per_sample: Sequence[float], token_budget: int,
              pipeline: bool, seq_multiple: int = 1) -> list[PackedRow]:
    """Packs the samples into rows of at most ``token_budget`` tokens (``pipeline``: every
    row padded to the budget, one shape for the pipeline; ``seq_multiple``: context
    parallelism's per-sample padding, ``data.packing.pack_samples``) with their per-position
    vectors."""
    packed = pack_samples([s.encoded for s in samples], [s.pixels for s in samples], token_budget,
                          pad_id=0, pad_to_multiple=token_budget if pipeline else 1, seq_multiple=seq_multiple)
    rows = []
    for mb in packed:
        columns: list[list[torch.Tensor]] = [[] for _ in range(6)]
        for idx in mb.sample_indices:
            s = samples[idx]
            targets = s.encoded.labels != IGNORE_INDEX
            vectors = (torch.where(targets, s.advantage, 0.0), torch.where(targets, weights_per_sample[idx], 0.0),
                       *_response_vector(s, s.old_logprobs), *_response_vector(s, s.engine_logprobs))
            for column, vector in zip(columns, vectors):
                column.append(vector)
        pad = mb.input_ids.shape[1] - sum(len(samples[i].encoded) for i in mb.sample_indices)
        adv, w, stored, has_stored, engine, has_engine = (torch.cat(c + [torch.zeros(pad)]) for c in columns)
        rows.append(PackedRow(mb, adv, w, stored, has_stored > 0, engine, (has_engine > 0) & (w > 0)))
    return rows


def per_sample(rows: Sequence[PackedRow], row_vectors: Sequence[torch.Tensor], n_samples: int
               ) -> list[Optional[np.ndarray]]:
    """Row vectors ``[L]`` cut back into per-sample vectors (whole sequence, by sample index);
    None for samples no row covers."""
    out: list[Optional[np.ndarray]] = [None] * n_samples
    for row, vector in zip(rows, row_vectors, strict=True):
        bounds = row.packed.cu_seqlens.tolist()
        for pos, idx in enumerate(row.packed.sample_indices):
            out[idx] = vector[bounds[pos]:bounds[pos + 1]].numpy()
    return out


def fresh_ssb_groups(items: Sequence[PromptItem], groups: Sequence[ScoredGroup], advantages: Sequence[np.ndarray],
                     samples: Sequence[TrainSample], sample_logprobs: Sequence[Optional[np.ndarray]],
                     step: int) -> list[SSBGroup]:
    """Every fresh group as an SSB record, with the trainer's log-probs of its responses
    where this rank computed them (zeros otherwise: a group the plan dropped, or a rank
    off the last pipeline stage)."""
    by_source = {s.fresh_source: k for k, s in enumerate(samples) if s.fresh_source is not None}
    out = []
    for i, (item, group) in enumerate(zip(items, groups, strict=True)):
        p = len(item.prompt_ids)
        tokens, old = [], []
        for j, response in enumerate(group.response_ids):
            tokens.append(np.concatenate([item.prompt_ids.numpy(), response.astype(np.int64)]))
            k = by_source.get((i, j))
            have = k is not None and sample_logprobs[k] is not None
            full = sample_logprobs[k] if have else np.zeros(p + len(response))
            old.append(full[p - 1: p + len(response) - 1].astype(np.float32))
        out.append(SSBGroup(
            prompt_id=item.record.id, step=step, token_ids=tokens, old_logprobs=old,
            loss_mask=[np.ones(len(r), dtype=bool) for r in group.response_ids],
            advantages=advantages[i].astype(np.float32),
            rewards={k: np.asarray(group.rewards[k], dtype=np.float64) for k in REWARD_TERMS},
            image_paths=tuple(str(x) for x in item.record.images)))
    return out


def response_kl_sums(rows: Sequence[PackedRow], samples: Sequence[TrainSample], policy_rows: Sequence[torch.Tensor],
                     reference_rows: Sequence[torch.Tensor], estimator: str) -> list[float]:
    """sum_t KL_t over each sample's response tokens (``losses.kl_reward.sequence_kl``) from the
    rows' policy and reference log-probs ``[L]`` (the last pipeline stage's)."""
    policy = per_sample(rows, policy_rows, len(samples))
    reference = per_sample(rows, reference_rows, len(samples))
    out = []
    for k, sample in enumerate(samples):
        mask = sample.encoded.labels != IGNORE_INDEX
        out.append(sequence_kl(torch.from_numpy(reference[k]), torch.from_numpy(policy[k]), mask, estimator))
    return out


def attach_kl_penalties(groups: Sequence[ScoredGroup], samples: Sequence[TrainSample], kl_sums: Sequence[float],
                        beta: float) -> None:
    """Sets each group's ``kl_penalty`` [G] = beta sum_t KL_t from the per-sample sums (fresh samples
    of every group, ``fresh_source`` naming each one's group and response)."""
    for group in groups:
        group.kl_penalty = np.zeros(len(group.response_ids), dtype=np.float64)
    for sample, kl in zip(samples, kl_sums, strict=True):
        i, j = sample.fresh_source
        groups[i].kl_penalty[j] = beta * float(kl)


@dataclass(frozen=True)
class DynamicSamplingStats:
    """One step's dynamic sampling (``grpo.dynamic_sampling``) over all DP ranks (identical on every rank)."""

    rounds: int
    drawn_groups: int
    """Groups rolled out over all rounds."""
    kept_groups: int
    """Effective groups kept for the batch (at most the target)."""
    target: int

    def metrics(self) -> dict[str, float]:
        return {"dynamic_sampling/rounds": float(self.rounds),
                "dynamic_sampling/kept_fraction": self.kept_groups / max(self.drawn_groups, 1)}


def dynamic_sampling_quota(kept: Sequence[int], new_effective: Sequence[int], target: int) -> list[int]:
    """How many of each DP rank's new effective groups a dynamic-sampling round keeps (DAPO,
    arXiv 2503.14476, Sec. 3.2: over-sample and filter until the batch is full of groups
    with a non-zero reward spread).

    ``kept[r]`` effective groups rank r holds from earlier rounds, ``new_effective[r]`` this
    round's; all of them while the total stays within ``target``, else the surplus goes by a
    deterministic rule that evens out the per-rank batch sizes: one group at a time to the
    rank holding the fewest (ties: lowest rank), each rank keeping its first ones in
    rollout order. Pure: every rank computes it from the same gathered counts."""
    if len(kept) != len(new_effective):
        raise ValueError(f"kept ({len(kept)}) and new_effective ({len(new_effective)}) need one count per rank")
    room = max(target - sum(kept), 0)
    if sum(new_effective) <= room:
        return list(new_effective)
    quota, size = [0] * len(kept), list(kept)
    heap = [(size[r], r) for r in range(len(kept)) if new_effective[r] > 0]
    heapq.heapify(heap)
    for _ in range(room):
        _, r = heapq.heappop(heap)
        quota[r] += 1
        size[r] += 1
        if quota[r] < new_effective[r]:
            heapq.heappush(heap, (size[r], r))
    return quota


def engine_correction(row: PackedRow, trainer_lp: torch.Tensor, tis_cap: Optional[float],
                      sums: StepSums) -> torch.Tensor:
    """Adds the |trainer - engine| log-prob gaps of the row's fresh tokens to ``sums`` and
    returns its loss weights, times the truncated importance ratio with a ``tis_cap``."""
    fresh = row.has_engine
    sums.gap_sum += float((trainer_lp - row.engine_logprobs).abs()[fresh].sum())
    sums.gap_tokens += float(fresh.sum())
    if tis_cap is None:
        return row.weights
    tis = torch.where(fresh, truncated_is_weights(trainer_lp, row.engine_logprobs, tis_cap), 1.0)
    sums.tis_sum += float(tis[fresh].sum())
    sums.tis_truncated += float((trainer_lp - row.engine_logprobs)[fresh].ge(math.log(tis_cap)).sum())
    return row.weights * tis


@dataclass
class StepBatch:
    """A step's batch on this rank: the rollout, its advantages, the SSB plan, the samples and rows."""

    items: list[PromptItem]
    groups: list[ScoredGroup]
    advantages: list[np.ndarray]
    plan: BatchPlan
    samples: list[TrainSample]
    rows: list[PackedRow] = field(default_factory=list)
