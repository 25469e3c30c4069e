"""MPO (Eq. 2-5) against values worked out by hand."""

import math

import pytest
import torch

from megatron_r1v.losses.mpo import (
    MPOLossConfig,
    RewardMean,
    generation_loss,
    mpo_loss,
    mpo_pair_losses,
    preference_loss,
    quality_loss,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_terms_hand_computed():
    # Two pairs, beta 0.5. Rewards r = 0.5 (logp - ref): chosen [1.0, -0.5], rejected [-1.0, 0.25].
    policy_c, ref_c = torch.tensor([-3.0, -6.0]), torch.tensor([-5.0, -5.0])
    policy_r, ref_r = torch.tensor([-7.0, -4.5]), torch.tensor([-5.0, -5.0])
    lengths = torch.tensor([3, 4])
    delta = -0.0625  # from earlier batches (RewardMean), an argument of the pure loss
    out = mpo_loss(policy_c, policy_r, ref_c, ref_r, lengths, MPOLossConfig(beta=0.5), delta)
    # Eq. 3: -mean(log sigma(1 - -1), log sigma(-0.5 - 0.25)).
    l_p = -(log_sigmoid(2.0) + log_sigmoid(-0.75)) / 2
    l_q = -(log_sigmoid(1.0 - delta) + log_sigmoid(-(-1.0 - delta))
            + log_sigmoid(-0.5 - delta) + log_sigmoid(-(0.25 - delta))) / 2
    # Eq. 5: mean(3/3, 6/4) = 1.25.
    l_g = 1.25
    assert out.delta == pytest.approx(delta)
    assert float(out.preference) == pytest.approx(l_p, rel=1e-6)
    assert float(out.quality) == pytest.approx(l_q, rel=1e-6)
    assert float(out.generation) == pytest.approx(l_g, rel=1e-6)
    assert float(out.loss) == pytest.approx(0.8 * l_p + 0.2 * l_q + 1.0 * l_g, rel=1e-6)
    assert out.reward_accuracy == 0.5 and out.reward_margin == pytest.approx((2.0 - 0.75) / 2)


def test_delta_is_a_running_mean_and_round_trips():
    state = RewardMean()
    assert state.update(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)
    assert state.update(torch.tensor([8.0, 8.0, 8.0, 8.0])) == pytest.approx((1 + 3 + 32) / 6)  # over all 6
    restored = RewardMean()
    restored.load_state_dict(state.state_dict())
    assert restored == state and restored.count == 6
    # Sums reduced over ranks fold in the same way as the tensors they came from.
    summed = RewardMean()
    summed.update_sum(4.0, 2)
    summed.update_sum(32.0, 4)
    assert summed.mean == pytest.approx(state.mean) and summed.count == 6


def test_pair_terms_average_to_the_batch_loss():
    torch.manual_seed(0)
    args = [torch.randn(5) - 4 for _ in range(4)] + [torch.tensor([1, 2, 3, 4, 5])]
    cfg = MPOLossConfig(beta=0.3, preference_weight=0.5, quality_weight=0.7, generation_weight=0.2)
    terms = mpo_pair_losses(*args, cfg, 0.1)
    batch = mpo_loss(*args, cfg, 0.1)
    # Splitting the step into micro-batches relies on the mean of per-pair terms being the loss.
    torch.testing.assert_close(terms.loss.mean(), batch.loss, rtol=1e-6, atol=0)
    manual = (0.5 * terms.preference + 0.7 * terms.quality + 0.2 * terms.generation)
    torch.testing.assert_close(terms.loss, manual, rtol=1e-6, atol=0)


def test_gradients_flow_to_the_policy_only():
    policy_c = torch.tensor([-2.0, -3.0], requires_grad=True)
    policy_r = torch.tensor([-2.5, -1.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -1.0])
    out = mpo_loss(policy_c, policy_r, ref_c, ref_r, torch.tensor([2, 2]), MPOLossConfig(beta=1.0), 0.0)
    out.loss.backward()
    # At policy == reference every reward is 0 and delta 0: d/dr_c of L_p = -sigma(0) / 2 = -0.25 per pair,
    # of L_q = -sigma(0) / 2 = -0.25; L_g adds -1 / (2 |y_c|) = -0.25. Weighted: 0.8 (-0.25) + 0.2 (-0.25) - 0.25 = -0.5.
    torch.testing.assert_close(policy_c.grad, torch.full((2,), -0.5), atol=1e-6, rtol=0)
    # Rejected: L_p gives +0.25, L_q gives +sigma(0)/2 = +0.25 -> 0.8 (0.25) + 0.2 (0.25) = 0.25.
    torch.testing.assert_close(policy_r.grad, torch.full((2,), 0.25), atol=1e-6, rtol=0)


def test_errors():
    with pytest.raises(ValueError, match="beta must be > 0"):
        MPOLossConfig(beta=0.0)
    with pytest.raises(ValueError, match=r"chosen responses need >= 1 token, got lengths \[0, 2\]"):
        generation_loss(torch.zeros(2), torch.tensor([0, 2]))
    assert float(preference_loss(torch.zeros(1), torch.zeros(1))) == pytest.approx(math.log(2))
    assert float(quality_loss(torch.zeros(1), torch.zeros(1), 0.0)) == pytest.approx(2 * math.log(2))
