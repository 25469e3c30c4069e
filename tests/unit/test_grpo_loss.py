"""GRPO advantages, normalization weights and the weighted objective against hand-computed values."""

import math

import pytest
import torch
from kernel_marks import kernel_backends  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.losses.grpo import (
    GRPOLossConfig,
    group_advantages,
    grpo_policy_loss,
    token_weights,
    truncated_is_weights,
)


def test_group_advantages_eq6_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0], [0.1, 0.1, 0.1, 0.1]])
    adv = group_advantages(rewards, eps=1e-6)
    # Group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.577350; +-0.5 / (0.577350 + 1e-6).
    a0 = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    torch.testing.assert_close(adv[0], torch.tensor([a0, -a0, -a0, a0]), atol=1e-7, rtol=0)
    # Groups 1 and 3: all equal -> exactly zero (0.1 * 4 / 4 is not exactly 0.1 in fp32).
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[3], torch.zeros(4))
    # Group 2: mean 0.75, var (3 * 0.5625 + 5.0625) / 3 = 2.25, std 1.5.
    torch.testing.assert_close(adv[2], torch.tensor([-0.5, -0.5, -0.5, 1.5]) * 1.5 / (1.5 + 1e-6), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match=r"rewards must be \[n_prompts, G\] with G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_token_weights():
    torch.testing.assert_close(token_weights(torch.tensor([2, 4]), "sequence", 4, 10), torch.tensor([1 / 8, 1 / 16]))
    torch.testing.assert_close(token_weights(torch.tensor([2, 4]), "token", 4, 10), torch.tensor([0.1, 0.1]))
    with pytest.raises(ValueError, match="every response needs >= 1 token"):
        token_weights(torch.tensor([0, 3]), "sequence", 2, 3)
    with pytest.raises(ValueError, match="normalization must be 'sequence', 'token' or 'constant'"):
        GRPOLossConfig(normalization="group")


def example_batch():
    # Row 0: uniform over 3 -> logp(label 0) = -ln 3; row 1: softmax [1/2, 1/4, 1/4];
    # row 2: the same, label 1 (p = 1/4); row 3 is padding (masked).
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [math.log(2), 0.0, 0.0], [5.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    old = torch.tensor([-math.log(3), math.log(0.25), math.log(0.5), 0.0])  # ratios 1, 2, 1/2
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])  # sequence A (rows 0-1): A = 1; sequence B (row 2): A = -1
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    weights = torch.tensor([1 / 4, 1 / 4, 1 / 2, 1 / 2])  # Eq. 8 over 2 sequences of lengths 2 and 1
    return logits, labels, old, adv, mask, weights


@pytest.mark.parametrize("backend", kernel_backends("torch", "interpret"))
def test_weighted_objective_hand_computed(backend):
    logits, labels, old, adv, mask, weights = example_batch()
    leaf = logits.clone().requires_grad_()
    out = grpo_policy_loss(leaf, labels, old, None, adv, mask, weights, GRPOLossConfig(), backend=backend)
    # Token terms: -A r = -1 (ratio 1); max(-2, -1.2) = -1.2 (clipped); max(0.5, 0.8) = 0.8 (clipped).
    torch.testing.assert_close(out.loss, torch.tensor(-1 / 4 - 1.2 / 4 + 0.8 / 2), atol=1e-6, rtol=0)
    assert out.clip_fraction == pytest.approx(2 / 3) and out.kl_mean is None
    out.loss.backward()
    # Only row 0 is unclipped: d/dlogits = w * (-A r) * (onehot - p) = -1/4 * [2/3, -1/3, -1/3].
    torch.testing.assert_close(leaf.grad[0], torch.tensor([-1 / 6, 1 / 12, 1 / 12]), atol=1e-6, rtol=0)
    assert torch.equal(leaf.grad[1:], torch.zeros(3, 3))


def test_kl_term_hand_computed():
    logits, labels, old, adv, mask, weights = example_batch()
    logp = torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0]
    ref = logp.clone()
    ref[0] += math.log(2)  # k3 = 2 - ln 2 - 1 = 0.306853 on row 0, 0 elsewhere
    out = grpo_policy_loss(logits, labels, old, ref, adv, mask, weights, GRPOLossConfig(kl_beta=0.1), backend="torch")
    k3 = 1 - math.log(2)
    torch.testing.assert_close(out.loss, torch.tensor(-0.15 + 0.1 * k3 / 4), atol=1e-6, rtol=0)
    assert out.kl_mean == pytest.approx(k3 / 3, abs=1e-6)


def test_truncated_is_weights_hand_computed():
    trainer = torch.tensor([-1.0, -2.0, -0.5, -30.0, -0.1], requires_grad=True)
    engine = torch.tensor([-1.0, -1.5, -3.0, -0.1, -40.0])
    weights = truncated_is_weights(trainer, engine, cap=2.0)
    # exp(0) = 1; exp(-0.5) = 0.60653; exp(2.5) = 12.18 -> cap 2; exp(-29.9) ~ 1e-13; exp(39.9) -> cap 2
    # (clamped in log space, so no overflow to inf).
    expected = torch.tensor([1.0, math.exp(-0.5), 2.0, math.exp(-29.9), 2.0])
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)  # fp32 rounding of exp only
    assert weights.dtype == torch.float32 and not weights.requires_grad  # a constant factor of the loss
    with pytest.raises(ValueError, match="TIS cap must be >= 1"):
        truncated_is_weights(trainer, engine, cap=0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        truncated_is_weights(trainer, engine[:3], cap=2.0)
