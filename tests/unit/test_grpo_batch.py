"""trainer/grpo_batch.py: one GRPO step's records from rollout to loss, checked by hand.

A step with two prompts of two responses each: prompt a's group is kept, prompt b's is
flat (zero advantage) and replaced by a group reused from the SSB. The tests follow every
response's tokens, advantage, weight and log-probs through samples, packed rows and back.
"""

import math
import time

import numpy as np
import pytest
import torch

from megatron_r1v.data.loader import PromptItem
from megatron_r1v.data.schema import PromptRecord
from megatron_r1v.data.template import IGNORE_INDEX
from megatron_r1v.ssb import BatchPlan, SSBGroup
from megatron_r1v.ssb.policy import TopUpStats
from megatron_r1v.trainer.grpo import PhaseTimer
from megatron_r1v.trainer.grpo_batch import (
    PackedRow,
    ScoredGroup,
    StepSums,
    engine_correction,
    fresh_ssb_groups,
    pack_rows,
    per_sample,
    train_samples,
)


def record(pid: str) -> PromptRecord:
    return PromptRecord(id=pid, images=(), question="q", answer="1", answer_type="number", choices=None)


def item(pid: str, prompt: list[int]) -> PromptItem:
    return PromptItem(record(pid), torch.tensor(prompt, dtype=torch.long), None, ())


def scored(responses: list[list[int]], totals: list[float]) -> ScoredGroup:
    return ScoredGroup(
        response_ids=[np.array(r, dtype=np.int64) for r in responses],
        engine_logprobs=[np.full(len(r), -0.5 - k, dtype=np.float32) for k, r in enumerate(responses)],
        rewards={"total": np.array(totals), "rule": np.array(totals), "format": np.zeros(len(totals)),
                 "model": np.zeros(len(totals))})


class OneRecordLoader:
    """The loader's two methods train_samples uses, for SSB prompts."""

    def __init__(self, items: dict[str, PromptItem]):
        self.items = items

    def record(self, prompt_id: str) -> PromptRecord:
        return self.items[prompt_id].record

    def prepare(self, rec: PromptRecord) -> PromptItem:
        return self.items[rec.id]


@pytest.fixture()
def step():
    items = [item("a", [1, 2, 3]), item("b", [4, 5])]
    groups = [scored([[7, 8], [9]], [1.0, 0.0]), scored([[6], [6, 6]], [0.5, 0.5])]
    advantages = [g.advantages() for g in groups]
    reused = SSBGroup(prompt_id="c", step=0, token_ids=[np.array([10, 11, 12, 13]), np.array([10, 11, 14])],
                      loss_mask=[np.array([True, False]), np.array([True])],
                      old_logprobs=[np.array([-1.0, -2.0], np.float32), np.array([-3.0], np.float32)],
                      advantages=np.array([0.7, -0.7], np.float32))
    stats = TopUpStats(2, 1, 1, 2, 1, 0, 1.0)
    plan = BatchPlan(keep_fresh=[0], drop_fresh=[1], reused=[reused], stats=stats)
    loader = OneRecordLoader({"c": item("c", [10, 11])})
    samples = train_samples(items, groups, advantages, plan, loader)
    return items, groups, advantages, plan, samples


def test_advantages_and_samples(step):
    items, groups, advantages, plan, samples = step
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # Eq. 6: mean 0.5, unbiased std sqrt(0.5), eps 1e-6
    np.testing.assert_allclose(advantages[0], [a, -a], rtol=1e-6)  # Eq. 6 runs in fp32
    assert np.array_equal(advantages[1], [0.0, 0.0])  # a flat group
    assert [s.fresh_source for s in samples] == [(0, 0), (0, 1), None, None]
    assert [s.advantage for s in samples] == [pytest.approx(a), pytest.approx(-a), pytest.approx(0.7),
                                              pytest.approx(-0.7)]
    fresh = samples[0].encoded
    assert fresh.input_ids.tolist() == [1, 2, 3, 7, 8] and fresh.prompt_len == 3
    assert fresh.labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]
    # The reused response keeps its loss mask (its second token carries no loss) and old log-probs.
    reused = samples[2]
    assert reused.encoded.labels.tolist() == [IGNORE_INDEX, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert reused.old_logprobs.tolist() == [-1.0, -2.0] and reused.engine_logprobs is None
    assert [s.target_count() for s in samples] == [2, 1, 1, 1]


def test_advantages_take_the_effective_group_criterion():
    """ScoredGroup.advantages(min_reward_std): a nearly-flat group (std 7e-4) gets zeros
    instead of the +-0.707 Eq. 6 gives any two different rewards; a real spread keeps Eq. 6
    bit for bit."""
    near_flat, spread = scored([[1], [2]], [1.0, 1.001]), scored([[1], [2]], [1.0, 0.0])
    assert np.abs(near_flat.advantages()).min() > 0.7  # the old rule: full-size advantages
    assert np.array_equal(near_flat.advantages(0.05), [0.0, 0.0])
    assert np.array_equal(spread.advantages(0.05), spread.advantages()) and spread.advantages(0.05).any()


def test_rows_carry_each_response_vector_at_its_label_positions(step):
    _, _, advantages, _, samples = step
    weights = [0.1, 0.2, 0.3, 0.4]
    rows = pack_rows(samples, weights, token_budget=64, pipeline=False)
    assert len(rows) == 1
    row = rows[0]
    labels = row.packed.labels[0]
    for pos, idx in enumerate(row.packed.sample_indices):
        start, end = row.packed.cu_seqlens[pos].item(), row.packed.cu_seqlens[pos + 1].item()
        targets = labels[start:end] != IGNORE_INDEX
        assert torch.equal(row.weights[start:end] != 0, targets)
        assert torch.allclose(row.advantages[start:end][targets], torch.tensor(samples[idx].advantage))
        assert torch.allclose(row.weights[start:end][targets], torch.tensor(weights[idx]))
        p = samples[idx].encoded.prompt_len
        if samples[idx].fresh_source is not None:  # engine log-probs at the loss positions only
            assert row.has_engine[start:end].tolist() == targets.tolist() and not row.has_stored[start:end].any()
            assert torch.equal(row.engine_logprobs[start + p - 1:end - 1], torch.from_numpy(samples[idx].engine_logprobs))
        else:  # stored old log-probs over the whole response, the masked token included
            assert row.has_stored[start + p - 1:end - 1].all() and not row.has_engine[start:end].any()
            assert torch.equal(row.stored_logprobs[start + p - 1:end - 1], torch.from_numpy(samples[idx].old_logprobs))
    piped = pack_rows(samples, weights, token_budget=8, pipeline=True)
    assert {r.packed.input_ids.shape[1] for r in piped} == {8}  # one shape for the pipeline


def test_per_sample_log_probs_go_back_to_the_fresh_ssb_groups(step):
    items, groups, advantages, _, samples = step
    rows = pack_rows(samples, [1.0] * 4, token_budget=6, pipeline=False)
    assert len(rows) > 1  # the scatter crosses rows
    # A "log-prob" per position: its global index, so every value says where it came from.
    row_vectors = [torch.arange(r.packed.input_ids.shape[1], dtype=torch.float32) + 100 * k
                   for k, r in enumerate(rows)]
    by_sample = per_sample(rows, row_vectors, len(samples))
    assert all(v is not None and len(v) == len(s.encoded) for v, s in zip(by_sample, samples))
    out = fresh_ssb_groups(items, groups, advantages, samples, by_sample, step=5)
    assert [g.prompt_id for g in out] == ["a", "b"] and all(g.step == 5 for g in out)
    a = out[0]
    assert [t.tolist() for t in a.token_ids] == [[1, 2, 3, 7, 8], [1, 2, 3, 9]]
    for j, k in ((0, 0), (1, 1)):  # response j of group a is sample k
        p = 3
        np.testing.assert_array_equal(a.old_logprobs[j], by_sample[k][p - 1:p - 1 + len(groups[0].response_ids[j])])
    # Group b was dropped from the batch: no log-probs were computed for it.
    assert all(not lp.any() for lp in out[1].old_logprobs)
    assert out[0].rewards["total"].tolist() == [1.0, 0.0] and np.array_equal(out[0].advantages,
                                                                          advantages[0].astype(np.float32))
    off_stage = fresh_ssb_groups(items, groups, advantages, samples, [None] * len(samples), step=5)
    assert all(not lp.any() for g in off_stage for lp in g.old_logprobs)


def test_engine_correction_weights_and_monitoring():
    """Gaps measured on fresh tokens only; TIS weights multiply the loss weights there and
    leave reused (SSB) and prompt positions alone."""
    trainer_lp = torch.tensor([0.0, -1.0, -2.0, -0.5, -1.0, -3.0])
    engine_lp = torch.tensor([0.0, -1.5, -1.0, -0.5, 0.0, 0.0])
    fresh = torch.tensor([False, True, True, True, False, False])  # positions 4-5: a reused response
    weights = torch.tensor([0.0, 0.25, 0.25, 0.25, 0.5, 0.5])
    row = PackedRow(packed=None, advantages=torch.zeros(6), weights=weights, stored_logprobs=torch.zeros(6),
                    has_stored=~fresh, engine_logprobs=engine_lp, has_engine=fresh)
    sums = StepSums()
    out = engine_correction(row, trainer_lp, None, sums)
    assert torch.equal(out, weights)  # tis_cap null: weights unchanged, the gap still measured
    assert sums.gap_sum == pytest.approx(0.5 + 1.0 + 0.0) and sums.gap_tokens == 3

    sums = StepSums()
    out = engine_correction(row, trainer_lp, 1.5, sums)
    # Fresh ratios exp(0.5) = 1.6487 -> cut to 1.5, exp(-1) = 0.3679, exp(0) = 1.
    expected = weights * torch.tensor([1.0, 1.5, math.exp(-1.0), 1.0, 1.0, 1.0])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    assert sums.tis_sum == pytest.approx(1.5 + math.exp(-1.0) + 1.0, rel=1e-6) and sums.tis_truncated == 1


def test_step_sums_are_named_and_round_trip():
    groups = [scored([[1, 2], [3]], [1.0, 0.25]), scored([[4]], [0.5])]
    sums = StepSums(entropy_sum=2.0)
    sums.add_rewards(groups)
    assert (sums.reward_total, sums.reward_rule, sums.responses, sums.response_tokens) == (1.75, 1.75, 3, 4)
    assert StepSums.from_list(sums.as_list()) == sums and len(sums.as_list()) == 12


def test_phase_timer_accumulates_named_phases():
    timer = PhaseTimer()
    with timer.phase("step"):
        for _ in range(2):
            with timer.phase("rollout"):
                time.sleep(0.01)
    assert set(timer.seconds) == {"step", "rollout"}
    assert timer.seconds["step"] >= timer.seconds["rollout"] >= 0.02
    with pytest.raises(RuntimeError):
        with timer.phase("train"):
            raise RuntimeError("a failed phase is still timed")
    assert timer.seconds["train"] >= 0.0
