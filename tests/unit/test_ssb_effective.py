"""The SSB's effective-group criterion with continuous rewards (ssb.min_reward_std).

With a reward-model score in the hybrid reward (Eq. 7) groups are almost never exactly
flat, and Eq. 6 divides by the group's std: a spread of 1e-3 gets advantages as large as
a spread of 1. The criterion (rewards not all equal, std >= ssb.min_reward_std) zeroes
the advantages of nearly-flat groups; the buffer's insert filter, the top-up and the
ssb/effective_ratio_* metrics then all treat them as ineffective. Rule-only rewards keep
the old rule (exactly flat groups only), bit for bit.
"""

import math

import numpy as np
import pytest
import torch

from megatron_r1v.config import RewardConfig, SSBConfig, load_config
from megatron_r1v.data.loader import PromptItem
from megatron_r1v.data.schema import PromptRecord
from megatron_r1v.losses.grpo import effective_groups, group_advantages
from megatron_r1v.ssb import (
    SelectiveSampleBuffer,
    SSBGroup,
    load,
    plan_batch,
    read_metadata,
    resolve_min_reward_std,
    save,
)
from megatron_r1v.trainer.grpo_batch import ScoredGroup, fresh_ssb_groups, train_samples

HYBRID = RewardConfig(model_weight=1.0, model_calibration="sigmoid")  # the 38B GRPO recipe's reward


def eq6_before_the_criterion(rewards_NG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """group_advantages as it was before ssb.min_reward_std existed (the reference)."""
    rewards = rewards_NG.to(torch.float32)
    mean_N1 = rewards.mean(dim=1, keepdim=True)
    std_N1 = rewards.std(dim=1, keepdim=True)
    centered = rewards - mean_N1
    flat_N1 = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat_N1, torch.zeros_like(centered), centered / (std_N1 + eps))


# Rule (weight 1) + format (weight 1) totals of G = 8, the flat ones included; 0.1 and
# 0.3 are not exact in binary, so a flat group's mean is off by an ulp (the old guard).
RULE_ONLY_TOTALS = torch.tensor([
    [2.0, 1.0, 1.0, 0.0, 2.0, 2.0, 1.0, 0.0],
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0],  # one right answer among 8: std 1 / sqrt(8)
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [1.3, 0.3, 1.3, 1.3, 0.3, 0.3, 1.3, 0.3],
], dtype=torch.float64)

# Continuous hybrid totals of G = 4 (rule + format + sigmoid model score).
SPREAD = [2.71, 0.62, 1.65, 0.55]          # right and wrong answers: a real signal
NEAR_FLAT = [1.62, 1.63, 1.61, 1.625]      # same verdicts, model scores within 0.01
FLAT = [0.5, 0.5, 0.5, 0.5]
NEAR_FLAT_HIGH = [2.71, 2.72, 2.70, 2.71]


# --- resolving ssb.min_reward_std --------------------------------------------------------


def test_auto_is_zero_for_discrete_rewards_and_scales_with_the_model_term():
    auto = SSBConfig()
    assert auto.min_reward_std == "auto"
    assert resolve_min_reward_std(auto, RewardConfig(), 8) == 0.0  # rule + format only
    assert resolve_min_reward_std(auto, RewardConfig(model_weight=1.0, model_calibration="step"), 8) == 0.0
    # 0.2 logits x steepest slope x |weight|, under half the std of one lone right answer.
    assert resolve_min_reward_std(auto, HYBRID, 8) == pytest.approx(0.05)
    assert resolve_min_reward_std(auto, RewardConfig(model_weight=-0.5, model_calibration="clip"), 8) \
        == pytest.approx(0.1)
    assert resolve_min_reward_std(auto, RewardConfig(model_weight=2.0), 8) == pytest.approx(0.5 / math.sqrt(8))
    assert resolve_min_reward_std(auto, RewardConfig(model_weight=1.0), 64) == pytest.approx(0.5 / 8)
    assert resolve_min_reward_std(auto, RewardConfig(rule_weight=0.0, format_weight=0.0, model_weight=1.0), 64) \
        == pytest.approx(0.2)  # no discrete verdict to protect: the noise floor alone
    assert resolve_min_reward_std(SSBConfig(min_reward_std=0.3), HYBRID, 8) == 0.3  # a number is kept
    assert resolve_min_reward_std(SSBConfig(min_reward_std=0.0), HYBRID, 8) == 0.0  # criterion off


def test_auto_never_drops_a_lone_right_answer():
    """The cap: one response differing by the smallest rule/format weight stays effective."""
    for g in (2, 4, 8, 16, 64, 256):
        for reward in (HYBRID, RewardConfig(model_weight=3.0), RewardConfig(format_weight=0.25, model_weight=1.0)):
            w = min(reward.rule_weight, reward.format_weight)
            lone = torch.zeros(1, g, dtype=torch.float64)
            lone[0, 0] = w
            assert effective_groups(lone, resolve_min_reward_std(SSBConfig(), reward, g)).item(), (g, reward)


def test_recipe_38b_resolves_auto_to_0_05():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples/configs/r1v2_38b_grpo.yaml")
    assert cfg.ssb.min_reward_std == "auto"
    assert resolve_min_reward_std(cfg.ssb, cfg.reward, cfg.rollout.n_samples) == pytest.approx(0.05)


# --- Eq. 6 with the criterion ------------------------------------------------------------


def test_rule_only_default_is_bit_identical_to_the_old_formula():
    min_std = resolve_min_reward_std(SSBConfig(), RewardConfig(), 8)
    new = group_advantages(RULE_ONLY_TOTALS, min_std=min_std)
    old = eq6_before_the_criterion(RULE_ONLY_TOTALS)
    assert new.dtype == old.dtype == torch.float32 and torch.equal(new, old)
    assert torch.equal(group_advantages(RULE_ONLY_TOTALS), old)  # the default argument too
    assert effective_groups(RULE_ONLY_TOTALS, min_std).tolist() == [True, True, False, False, True]
    groups = [ScoredGroup([np.zeros(1, np.int64)] * 8, [np.zeros(1, np.float32)] * 8,
                          {"total": row.numpy()}) for row in RULE_ONLY_TOTALS]
    for group, row in zip(groups, old):
        assert np.array_equal(group.advantages(min_std), row.numpy()) and group.advantages(min_std).dtype == np.float32


def test_nearly_flat_groups_get_zero_advantages_and_the_others_are_unchanged():
    totals = torch.tensor([SPREAD, NEAR_FLAT, FLAT, NEAR_FLAT_HIGH], dtype=torch.float64)
    old = eq6_before_the_criterion(totals)
    # What the criterion is for: without it a 0.01 spread gets full-size advantages.
    assert old[1].abs().max() > 1.0 and old[3].abs().max() > 1.0
    min_std = resolve_min_reward_std(SSBConfig(), RewardConfig(model_weight=1.0, model_calibration="sigmoid"), 4)
    new = group_advantages(totals, min_std=min_std)
    assert effective_groups(totals, min_std).tolist() == [True, False, False, False]
    assert torch.equal(new[0], old[0])  # above the threshold: the same Eq. 6, bit for bit
    assert not new[1:].any()
    # The boundary is std >= min_std (fp32, as Eq. 6 computes it): equal to it is effective.
    std = float(totals[:1].to(torch.float32).std())
    assert effective_groups(totals[:1], std).item() and not effective_groups(totals[:1], std * 1.001).item()
    with pytest.raises(ValueError, match=r"min_std \(ssb\.min_reward_std\) must be a finite number >= 0"):
        group_advantages(totals, min_std=-1.0)


# --- the SSB: top-up, metrics, insert filter ----------------------------------------------


def record(pid: str) -> PromptRecord:
    return PromptRecord(id=pid, images=(), question="q", answer="1", answer_type="number", choices=None)


def continuous_step():
    """Four fresh prompts of G = 4 under the hybrid reward: one real spread, two nearly-flat
    groups and one exactly flat."""
    items = [PromptItem(record(f"p{i}"), torch.tensor([1, 2, 3 + i]), None, ()) for i in range(4)]
    groups = [ScoredGroup(response_ids=[np.array([7, 8 + j], np.int64) for j in range(4)],
                          engine_logprobs=[np.full(2, -0.5, np.float32)] * 4,
                          rewards={"total": np.array(t), "rule": np.zeros(4), "format": np.ones(4),
                                   "model": np.array(t) - 1.0})
              for t in (SPREAD, NEAR_FLAT, FLAT, NEAR_FLAT_HIGH)]
    return items, groups


def stored(pid: str, step: int, totals) -> SSBGroup:
    adv = group_advantages(torch.tensor([totals], dtype=torch.float64))[0].numpy()
    return SSBGroup(pid, step, [np.arange(4) + k for k in range(len(totals))], [np.ones(2, bool)] * len(totals),
                    [np.full(2, -1.0, np.float32)] * len(totals), adv, rewards={"total": totals})


def buffered() -> SelectiveSampleBuffer:
    buf = SelectiveSampleBuffer(SSBConfig(target_effective_ratio=1.0))
    buf.insert([stored(f"old{i}", 0, [1.0 + i, 0.0, 2.0, 0.5]) for i in range(3)])
    return buf


@pytest.mark.parametrize("criterion", ["auto", "off"])
def test_top_up_and_effective_ratio_use_the_criterion(criterion):
    items, groups = continuous_step()
    ssb = SSBConfig(min_reward_std="auto" if criterion == "auto" else 0.0)
    min_std = resolve_min_reward_std(ssb, HYBRID, 4)
    advantages = [g.advantages(min_std) for g in groups]
    plan = plan_batch(buffered(), advantages, step=1)
    metrics = plan.stats.metrics()
    if criterion == "auto":  # only p0 is effective: the three others are replaced
        assert (plan.stats.fresh_effective, plan.stats.reused_groups) == (1, 3)
        assert plan.keep_fresh == [0] and plan.drop_fresh == [1, 2, 3]
        assert metrics["ssb/effective_ratio_fresh"] == 0.25 and metrics["ssb/effective_ratio_batch"] == 1.0
    else:  # the old rule: only the exactly flat p2 is ineffective
        assert (plan.stats.fresh_effective, plan.stats.reused_groups) == (3, 1)
        assert plan.keep_fresh == [0, 1, 3] and plan.drop_fresh == [2]
        assert metrics["ssb/effective_ratio_fresh"] == 0.75 and metrics["ssb/effective_ratio_batch"] == 1.0


@pytest.mark.parametrize("criterion", ["auto", "off"])
def test_near_flat_groups_are_not_inserted(criterion):
    items, groups = continuous_step()
    min_std = resolve_min_reward_std(SSBConfig(min_reward_std="auto" if criterion == "auto" else 0.0), HYBRID, 4)
    advantages = [g.advantages(min_std) for g in groups]
    buf = SelectiveSampleBuffer(SSBConfig())
    plan = plan_batch(buf, advantages, step=0)  # an empty buffer: nothing replaces them
    samples = train_samples(items, groups, advantages, plan, loader=None)
    stats = buf.insert(fresh_ssb_groups(items, groups, advantages, samples, [None] * len(samples), step=0))
    kept = sorted(g.prompt_id for g in buf.groups)
    if criterion == "auto":
        assert kept == ["p0"] and (stats.inserted, stats.zero_advantage) == (1, 3)
        # Kept in the batch for lack of buffered groups, but with A = 0: no gradient from them.
        assert [s.advantage for s in samples if s.fresh_source[0] in (1, 3)] == [0.0] * 8
    else:
        assert kept == ["p0", "p1", "p3"] and (stats.inserted, stats.zero_advantage) == (3, 1)
        assert max(abs(s.advantage) for s in samples if s.fresh_source[0] == 1) > 1.0


# --- checkpoint / resume -------------------------------------------------------------------


def test_store_keeps_the_key_and_resume_drops_groups_below_a_stricter_criterion(tmp_path):
    buf = SelectiveSampleBuffer(SSBConfig(min_reward_std=0.0, seed=5))
    buf.insert([stored("spread", 0, SPREAD), stored("near", 0, NEAR_FLAT), stored("near-high", 1, NEAR_FLAT_HIGH),
                SSBGroup("no-total", 1, [np.arange(3)] * 2, [np.ones(1, bool)] * 2, [np.zeros(1)] * 2, [0.5, -0.5])])
    assert len(buf) == 4  # admitted under the old rule (min_reward_std 0)
    save(buf, tmp_path / "ssb", step=2)
    assert read_metadata(tmp_path / "ssb").config["min_reward_std"] == 0.0
    same = load(tmp_path / "ssb")
    assert same.config.min_reward_std == 0.0 and same.drop_ineffective(0.0) == 0  # same criterion: untouched
    assert [g.uid for g in same.groups] == [g.uid for g in buf.groups]
    stricter = load(tmp_path / "ssb", config=SSBConfig(min_reward_std=0.05, seed=5))
    assert stricter.drop_ineffective(resolve_min_reward_std(stricter.config, HYBRID, 4)) == 2
    assert sorted(g.prompt_id for g in stricter.groups) == ["no-total", "spread"]


def test_store_written_before_the_key_loads_with_auto(tmp_path):
    import zarr

    save(buffered(), tmp_path / "ssb", step=1)
    root = zarr.open_group(str(tmp_path / "ssb"), mode="r+")
    config = dict(root.attrs["config"])
    del config["min_reward_std"]
    root.attrs["config"] = config
    assert load(tmp_path / "ssb").config.min_reward_std == "auto"


# --- the config contract -------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "bogus", True, None])
def test_bad_min_reward_std_names_the_key(value):
    with pytest.raises(ValueError, match=r"ssb\.min_reward_std must be 'auto' or a finite number >= 0"):
        SelectiveSampleBuffer(SSBConfig(min_reward_std=value))
    with pytest.raises(ValueError, match=r"ssb\.min_reward_std must be"):
        resolve_min_reward_std(SSBConfig(min_reward_std=value), HYBRID, 8)


def test_min_reward_std_from_recipes_and_overrides():
    assert load_config(None, []).ssb.min_reward_std == "auto"
    assert load_config(None, ["ssb.min_reward_std=auto"]).ssb.min_reward_std == "auto"
    assert load_config(None, ["ssb.min_reward_std=0.05"]).ssb.min_reward_std == 0.05
    assert load_config(None, ["ssb.min_reward_std=0"]).ssb.min_reward_std == 0.0
    assert load_config(None, ["ssb.min_reward_std=1e-3"]).ssb.min_reward_std == 1e-3
    with pytest.raises(ValueError, match=r"ssb\.min_reward_std must be 'auto' or a finite number >= 0"):
        load_config(None, ["ssb.min_reward_std=-0.5"])
    with pytest.raises(ValueError, match=r"config key 'ssb\.min_reward_std'"):
        load_config(None, ["ssb.min_reward_std=fixed"])
    with pytest.raises(ValueError, match=r"config key 'ssb\.min_reward_std'"):
        load_config(None, ["ssb.min_reward_std=true"])
    with pytest.raises(ValueError, match=r"rollout\.n_samples"):
        resolve_min_reward_std(SSBConfig(), HYBRID, 1)
