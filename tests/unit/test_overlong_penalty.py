"""DAPO's soft overlong punishment (Eq. 13): the pure function, its config checks and its metric."""

import numpy as np
import pytest

from megatron_r1v.config import RewardConfig, load_config
from megatron_r1v.rewards.overlong import overlong_penalty
from megatron_r1v.trainer.grpo_batch import ScoredGroup, overlong_sum
from megatron_r1v.trainer.metrics import GRPO_TAGS
from megatron_r1v.validation import check_reward_config


@pytest.mark.parametrize(
    "length,expected",
    [
        # L_max = 100, L_cache = 20: the punishment starts after L_max - L_cache = 80 tokens.
        (0, 0.0),
        (80, 0.0),      # |y| = L_max - L_cache: still 0
        (81, -0.05),    # (80 - 81) / 20
        (90, -0.5),     # (80 - 90) / 20, inside the buffer
        (99, -0.95),    # (80 - 99) / 20
        (100, -1.0),    # |y| = L_max: (80 - 100) / 20
        (101, -1.0),    # |y| > L_max
        (5000, -1.0),
    ],
)
def test_eq13_by_hand(length, expected):
    assert overlong_penalty(length, 100, 20) == pytest.approx(expected, abs=1e-15)


def test_smallest_and_largest_buffers():
    # L_cache = 1: only |y| = L_max (truncated, or stopped on its last token) is punished, fully.
    assert [overlong_penalty(n, 8, 1) for n in (6, 7, 8, 9)] == [0.0, 0.0, -1.0, -1.0]
    # L_cache = L_max - 1: linear from 1 token on.
    assert [overlong_penalty(n, 5, 4) for n in (1, 2, 3, 5, 6)] == [0.0, -0.25, -0.5, -1.0, -1.0]


def test_buffer_zero_is_off():
    assert [overlong_penalty(n, 100, 0) for n in (0, 100, 101, 10_000)] == [0.0] * 4


@pytest.mark.parametrize("length,max_tokens,buffer", [(5, 100, -1), (5, 100, 100), (5, 100, 150), (-1, 100, 10)])
def test_bad_arguments(length, max_tokens, buffer):
    with pytest.raises(ValueError, match="overlong_penalty"):
        overlong_penalty(length, max_tokens, buffer)


@pytest.mark.parametrize(
    "override,message",
    [
        ("reward.overlong_buffer_tokens=-1", r"reward\.overlong_buffer_tokens must be >= 0, got -1"),
        ("reward.overlong_buffer_tokens=1024",
         r"reward\.overlong_buffer_tokens must be < rollout\.max_new_tokens=1024"),
        ("reward.overlong_penalty_weight=-0.5", r"reward\.overlong_penalty_weight must be finite and >= 0"),
    ],
)
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1e-9])
def test_weight_must_be_finite_and_not_negative(weight):
    with pytest.raises(ValueError, match=r"reward\.overlong_penalty_weight must be finite and >= 0"):
        check_reward_config(RewardConfig(overlong_buffer_tokens=8, overlong_penalty_weight=weight), max_new_tokens=16)


def test_config_accepts_and_defaults():
    default = load_config(None, [])
    assert (default.reward.overlong_buffer_tokens, default.reward.overlong_penalty_weight) == (0, 1.0)
    cfg = load_config(None, ["rollout.max_new_tokens=512", "reward.overlong_buffer_tokens=511",
                             "reward.overlong_penalty_weight=0.5"])
    assert (cfg.reward.overlong_buffer_tokens, cfg.reward.overlong_penalty_weight) == (511, 0.5)
    with pytest.raises(ValueError, match=r"reward\.overlong_buffer_tokens must be < rollout\.max_new_tokens=512"):
        load_config(None, ["rollout.max_new_tokens=512", "reward.overlong_buffer_tokens=512"])
    # Without the budget (a tool's own RewardConfig) only the sign is checked.
    check_reward_config(RewardConfig(overlong_buffer_tokens=4096))
    with pytest.raises(ValueError, match=r"reward\.overlong_buffer_tokens must be an integer"):
        check_reward_config(RewardConfig(overlong_buffer_tokens=2.5))


def test_metric_is_the_mean_over_responses():
    assert "reward/overlong_penalty" in GRPO_TAGS

    def group(overlong, with_term=True):
        rewards = {k: np.zeros(len(overlong)) for k in ("total", "rule", "format", "model")}
        if with_term:
            rewards["overlong"] = np.asarray(overlong, dtype=np.float64)
        n = len(overlong)
        return ScoredGroup([np.zeros(3, dtype=np.int64)] * n, [np.zeros(3, dtype=np.float32)] * n, rewards)

    assert overlong_sum([group([0.0, -0.5]), group([-1.0, 0.0])]) / 4 == pytest.approx(-0.375)
    # A group scored without the term (the SSB pool's REWARD_TERMS) adds 0.
    assert overlong_sum([group([-0.25]), group([-1.0, -1.0], with_term=False)]) == -0.25
