"""grpo.kl_placement reward (losses/kl_reward.py, verl's use_kl_in_reward) against hand-computed values:
known log-probs -> per-response KL sums -> shaped rewards -> Eq. 6 advantages."""

import math

import numpy as np
import pytest
import torch

from megatron_r1v.config import RunConfig
from megatron_r1v.data.loader import PromptItem
from megatron_r1v.data.schema import PromptRecord
from megatron_r1v.data.template import IGNORE_INDEX
from megatron_r1v.losses.grpo import GRPOLossConfig
from megatron_r1v.losses.kl_reward import kl_shaped_rewards, sequence_kl
from megatron_r1v.trainer.grpo import loss_config
from megatron_r1v.trainer.grpo_batch import (
    ScoredGroup,
    attach_kl_penalties,
    fresh_samples,
    kl_penalty_sum,
    pack_rows,
    response_kl_sums,
)
from megatron_r1v.trainer.metrics import KL_REWARD_TAGS, GRPO_TAGS, MetricsLogger, stage_tags


def scored(responses: list[list[int]], totals: list[float]) -> ScoredGroup:
    return ScoredGroup(
        response_ids=[np.array(r, dtype=np.int64) for r in responses],
        engine_logprobs=[np.zeros(len(r), dtype=np.float32) for r in responses],
        rewards={"total": np.array(totals), "rule": np.array(totals), "format": np.zeros(len(totals)),
                 "model": np.zeros(len(totals))})


def item(pid: str, prompt: list[int]) -> PromptItem:
    rec = PromptRecord(id=pid, images=(), question="q", answer="1", answer_type="number", choices=None)
    return PromptItem(rec, torch.tensor(prompt, dtype=torch.long), None, ())


def test_sequence_kl_hand_computed_for_each_estimator():
    # x = ref - logp = [0.5, -1.0] on the two response tokens; the third position is masked
    # (its huge gap must not count).
    ref, logp, mask = torch.tensor([-1.0, -2.0, 0.0]), torch.tensor([-1.5, -1.0, -30.0]), torch.tensor([1, 1, 0])
    assert sequence_kl(ref, logp, mask, "k1") == pytest.approx(-0.5 + 1.0, abs=1e-12)
    assert sequence_kl(ref, logp, mask, "k2") == pytest.approx(0.125 + 0.5, abs=1e-12)
    # k3: (e^0.5 - 0.5 - 1) + (e^-1 + 1 - 1) = 0.14872127 + 0.36787944
    assert sequence_kl(ref, logp, mask, "k3") == pytest.approx(0.5166007118715705, abs=1e-12)
    # The loss path's clamp: x = 30 is taken as 20 (k1 = -20, k3 = e^20 - 21).
    big = torch.tensor([0.0]), torch.tensor([-30.0]), torch.tensor([1])
    assert sequence_kl(*big, "k1") == -20.0
    assert sequence_kl(*big, "k3") == pytest.approx(math.exp(20) - 21, rel=1e-12)
    with pytest.raises(ValueError, match="kl_estimator"):
        sequence_kl(*big, "k4")


def test_shaped_rewards_and_their_advantages_hand_computed():
    # r = [1, 0, 0], sum_t KL = [2, 0, 4], beta 0.1: r' = [0.8, 0, -0.4].
    np.testing.assert_allclose(kl_shaped_rewards(np.array([1.0, 0.0, 0.0]), np.array([2.0, 0.0, 4.0]), 0.1),
                               [0.8, 0.0, -0.4], atol=1e-15)
    group = scored([[5], [6], [7]], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(group.advantages(), [1.1547, -0.57735, -0.57735], atol=1e-4)  # unshaped Eq. 6
    group.kl_penalty = np.array([0.2, 0.0, 0.4])  # beta sum_t KL_t
    np.testing.assert_allclose(group.shaped_totals(), [0.8, 0.0, -0.4], atol=1e-15)
    # mean 0.4/3, centred [2/3, -2/15, -8/15], unbiased std sqrt(0.746667 / 2) = 0.6110101:
    np.testing.assert_allclose(group.advantages(), [1.0910877, -0.2182175, -0.8728701], rtol=1e-5)
    # Dr. GRPO's advantage (no std) of the shaped rewards: the centred values.
    np.testing.assert_allclose(group.advantages(std_normalize=False), [2 / 3, -2 / 15, -8 / 15], rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        kl_shaped_rewards(np.zeros(3), np.zeros(2), 0.1)


def test_kl_sums_from_packed_rows_to_penalties_and_advantages():
    """Known per-token log-probs on packed rows -> per-response KL sums (k1) -> penalties -> A."""
    items = [item("a", [1, 2]), item("b", [3])]
    groups = [scored([[5, 6, 7], [8]], [1.0, 0.0]), scored([[9, 9], [4, 4]], [0.0, 0.0])]  # b: flat
    samples = fresh_samples(items, groups, [np.zeros(2), np.zeros(2)], range(2))
    assert [s.fresh_source for s in samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    rows = pack_rows(samples, [0.0] * 4, token_budget=6, pipeline=False)
    assert len(rows) > 1  # the sums come back across rows
    x = [-0.2, 0.5, -1.0, 0.0]  # ref - policy on each sample's response tokens
    policy, reference = [], []
    for row in rows:
        length, bounds = row.packed.input_ids.shape[1], row.packed.cu_seqlens.tolist()
        pol, ref = torch.full((length,), -1.0), torch.full((length,), 7.0)  # 7: off-response, must not count
        for pos, idx in enumerate(row.packed.sample_indices):
            targets = samples[idx].encoded.labels != IGNORE_INDEX
            ref[bounds[pos]:bounds[pos + 1]][targets] = -1.0 + x[idx]
        policy.append(pol)
        reference.append(ref)
    sums = response_kl_sums(rows, samples, policy, reference, "k1")
    # k1 = -x per token, times the response lengths 3, 1, 2, 2.
    assert sums == pytest.approx([0.6, -0.5, 2.0, 0.0], abs=1e-6)
    attach_kl_penalties(groups, samples, sums, beta=0.1)
    np.testing.assert_allclose(groups[0].kl_penalty, [0.06, -0.05], atol=1e-7)
    np.testing.assert_allclose(groups[1].kl_penalty, [0.2, 0.0], atol=1e-7)
    assert kl_penalty_sum(groups) == pytest.approx(0.21, abs=1e-7)
    # The flat group b ([0, 0]) is shaped to [-0.2, 0]: it now has a spread and advantages -+1/sqrt(2).
    np.testing.assert_allclose(groups[1].advantages(), [-0.7071048, 0.7071048], rtol=1e-5)
    np.testing.assert_allclose(groups[0].advantages(), [0.7071048, -0.7071048], rtol=1e-5)


def test_loss_has_no_kl_term_with_reward_placement():
    cfg = RunConfig()
    cfg.grpo.kl_beta, cfg.grpo.kl_placement = 0.05, "reward"
    assert loss_config(cfg) == GRPOLossConfig(kl_beta=0.0)
    cfg.grpo.kl_placement = "loss"
    assert loss_config(cfg).kl_beta == 0.05


def test_config_validation_and_documentation():
    cfg = RunConfig()
    assert cfg.grpo.kl_placement == "loss"  # the report's Eq. 8 stays the default
    cfg.grpo.kl_placement = "reward"
    with pytest.raises(ValueError, match=r"grpo.kl_placement=reward needs grpo.kl_beta > 0"):
        cfg.validate()
    cfg.grpo.kl_beta = 0.01
    cfg.validate()
    cfg.grpo.kl_placement = "rewards"
    with pytest.raises(ValueError, match="grpo.kl_placement must be 'loss' or 'reward'"):
        cfg.validate()
    from megatron_r1v.config import field_docs

    doc = {name: doc for name, _, doc in field_docs()}["grpo.kl_placement"]
    assert "use_kl_in_reward" in doc and "kl_beta" in doc and "train/kl_penalty" in doc


def test_kl_penalty_tag_is_declared():
    assert stage_tags("grpo", kl_reward=True) == GRPO_TAGS + KL_REWARD_TAGS + stage_tags("sft")[-2:]
    assert "train/kl_penalty" not in stage_tags("grpo")  # only emitted with the switch
    # train.py's logger (no kl_reward flag) still accepts it for a GRPO run.
    logger = MetricsLogger(stage_tags("grpo"), stage="grpo", total_steps=1, log_interval=1,
                           device=torch.device("cpu"), is_rank0=False)
    assert logger.log(0, {"train/kl_penalty": 0.5}, lr=1e-3)["train/kl_penalty"] == 0.5
