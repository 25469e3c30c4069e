"""GRPO loss variants (losses/grpo_variants.py, grpo.* switches) against hand-computed values.

Tolerances: fp32 throughout; hand values are exact up to fp32 rounding of exp/log (~1e-7
relative), so 1e-6 absolute on O(1) quantities.
"""

import math

import numpy as np
import pytest
import torch
from kernel_marks import kernel_backends  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.config import RunConfig, field_docs, load_config
from megatron_r1v.kernels import grpo_loss
from megatron_r1v.losses.grpo import GRPOLossConfig, group_advantages, grpo_policy_loss, token_weights
from megatron_r1v.losses.grpo_variants import (
    clipped_surrogate,
    kl_estimate,
    segment_ids,
    sequence_log_ratio,
    variant_token_terms,
)
from megatron_r1v.trainer.grpo import loss_config
from megatron_r1v.trainer.grpo_batch import ScoredGroup

LN2 = math.log(2.0)


def example_batch():
    # Row 0: uniform over 3 -> logp(label 0) = -ln 3; row 1: softmax [1/2, 1/4, 1/4], label 0;
    # row 2: the same, label 1 (p = 1/4); row 3 is padding (masked). Ratios 1, 2, 1/2.
    logits = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [LN2, 0.0, 0.0], [5.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    old = torch.tensor([-math.log(3), math.log(0.25), math.log(0.5), 0.0])
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    weights = torch.tensor([1 / 4, 1 / 4, 1 / 2, 1 / 2])  # Eq. 8 over 2 sequences of lengths 2 and 1
    return logits, labels, old, adv, mask, weights


def softmax_rows():
    return torch.softmax(example_batch()[0], -1)


def run(cfg, ref=None, adv=None, backend="torch", segments=None):
    logits, labels, old, adv0, mask, weights = example_batch()
    leaf = logits.clone().requires_grad_()
    out = grpo_policy_loss(leaf, labels, old, ref, adv0 if adv is None else adv, mask, weights, cfg,
                           backend=backend, segment_ids=segments)
    out.loss.backward()
    return out, leaf.grad


# -- the default stays the fused kernel, bit for bit --------------------------------------------
@pytest.mark.parametrize("kl_beta", [0.0, 0.1])
def test_default_is_the_fused_kernel_bit_identical(kl_beta):
    logits, labels, old, adv, mask, weights = example_batch()
    ref = old + 0.3
    cfg = GRPOLossConfig(kl_beta=kl_beta)
    assert cfg.fused
    out, grad = run(cfg, ref=ref)
    leaf = logits.clone().requires_grad_()
    loss_T, _ = grpo_loss(leaf, labels, old, ref if kl_beta else None, adv, mask, kl_beta=kl_beta, backend="torch")
    expected = (loss_T * weights).sum()
    expected.backward()
    assert torch.equal(out.loss, expected) and torch.equal(grad, leaf.grad)


def test_trainer_loss_config_defaults_and_switches():
    assert loss_config(RunConfig()) == GRPOLossConfig() and loss_config(RunConfig()).fused
    cfg = load_config(None, ["grpo.kl_estimator=k2", "grpo.clip_ratio_c=3", "grpo.importance_level=sequence",
                             "rollout.temperature=0.7"])
    assert loss_config(cfg) == GRPOLossConfig(kl_estimator="k2", clip_ratio_c=3.0, importance_level="sequence",
                                              temperature=0.7)
    assert not loss_config(cfg).fused


@pytest.mark.parametrize("backend", kernel_backends("torch", "interpret"))
def test_variant_path_at_neutral_settings_matches_fused(backend):
    # clip_ratio_c = 1e9 never binds here, so the torch path must reproduce the kernel (k3 KL on).
    logits, labels, old, adv, mask, weights = example_batch()
    ref = old + torch.tensor([0.4, -0.3, 0.2, 7.0])
    fused, g_fused = run(GRPOLossConfig(kl_beta=0.1), ref=ref, backend=backend)
    variant, g_variant = run(GRPOLossConfig(kl_beta=0.1, clip_ratio_c=1e9), ref=ref, backend=backend)
    torch.testing.assert_close(variant.loss, fused.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_variant, g_fused, atol=1e-6, rtol=0)
    assert variant.clip_fraction == fused.clip_fraction
    assert variant.kl_mean == pytest.approx(fused.kl_mean, abs=1e-6)


# -- KL estimators -------------------------------------------------------------------------------
def test_kl_estimators_hand_computed_forward_and_gradient():
    # x = ref - logp = [ln 2, -ln 2, 0, 29.5 (clamped to 20: constant, no gradient)]
    logp = torch.tensor([-1.0, -2.0, -0.5, -30.0])
    ref = logp + torch.tensor([LN2, -LN2, 0.0, 29.5])
    expected = {  # (value, d value / d logp)
        "k1": ([-LN2, LN2, 0.0, -20.0], [1.0, 1.0, 1.0, 0.0]),
        "k2": ([LN2 ** 2 / 2, LN2 ** 2 / 2, 0.0, 200.0], [-LN2, LN2, 0.0, 0.0]),
        "k3": ([1 - LN2, LN2 - 0.5, 0.0, math.exp(20.0) - 21.0], [-1.0, 0.5, 0.0, 0.0]),
    }
    for name, (value, grad) in expected.items():
        leaf = logp.clone().requires_grad_()
        kl = kl_estimate(ref, leaf, name)
        kl.sum().backward()
        torch.testing.assert_close(kl, torch.tensor(value), rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(leaf.grad, torch.tensor(grad), rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        kl_estimate(ref, logp, "k4")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        GRPOLossConfig(kl_estimator="k4")


@pytest.mark.parametrize("backend", kernel_backends("torch", "interpret"))
def test_k1_through_the_loss_hand_computed(backend):
    logits, labels, *_ = example_batch()
    logp = torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0]
    ref = logp + torch.tensor([LN2, 0.0, 0.0, 0.0])  # k1 = -ln 2 on row 0, 0 on rows 1-2
    out, grad = run(GRPOLossConfig(kl_beta=0.1, kl_estimator="k1"), ref=ref, backend=backend)
    # Policy terms as in test_grpo_loss: -1/4 - 1.2/4 + 0.8/2 = -0.15 (rows 1-2 clipped).
    torch.testing.assert_close(out.loss, torch.tensor(-0.15 - 0.1 * LN2 / 4), atol=1e-6, rtol=0)
    assert out.kl_mean == pytest.approx(-LN2 / 3, abs=1e-6)
    # dk1/dlogp = 1 on every active row; d logp / d logits = onehot - p.
    p = softmax_rows()
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    expected = torch.stack([(-1 / 4 + 0.1 / 4) * (onehot[0] - p[0]), 0.1 / 4 * (onehot[1] - p[1]),
                            0.1 / 2 * (onehot[2] - p[2]), torch.zeros(3)])
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)


# -- dual clip -----------------------------------------------------------------------------------
def test_dual_clip_surrogate_hand_computed():
    log_ratio = torch.tensor([math.log(5.0), LN2, math.log(5.0), math.log(0.5)], requires_grad=True)
    adv = torch.tensor([-1.0, -1.0, 1.0, -1.0])
    loss, ratio, clipped = clipped_surrogate(log_ratio, adv, 0.2, 0.2, 3.0)
    # t0: A < 0, r = 5: max(5, 1.2) = 5 > 3 -> capped at 3 (dual clip), no gradient.
    # t1: A < 0, r = 2: 2 < 3, unclipped, d(-A r)/d log r = r = 2.  t2: A > 0, r = 5: -1.2, clipped.
    # t3: A < 0, r = 1/2: max(0.5, 0.8) = 0.8, clipped.
    torch.testing.assert_close(loss, torch.tensor([3.0, 2.0, -1.2, 0.8]), atol=1e-6, rtol=0)
    assert clipped.tolist() == [True, False, True, True]
    loss.sum().backward()
    torch.testing.assert_close(log_ratio.grad, torch.tensor([0.0, 2.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    off, _, off_clipped = clipped_surrogate(log_ratio.detach(), adv, 0.2, 0.2, None)
    torch.testing.assert_close(off, torch.tensor([5.0, 2.0, -1.2, 0.8]), atol=1e-6, rtol=0)
    assert off_clipped.tolist() == [False, False, True, True]


@pytest.mark.parametrize("backend", kernel_backends("torch", "interpret"))
def test_dual_clip_through_the_loss_hand_computed(backend):
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])  # row 1: A = -1 with ratio 2
    out, grad = run(GRPOLossConfig(clip_ratio_c=1.5), adv=adv, backend=backend)
    # Rows: -1 (ratio 1); min(max(2, 1.2), 1.5) = 1.5 (dual clip); max(0.5, 0.8) = 0.8.
    torch.testing.assert_close(out.loss, torch.tensor(-1 / 4 + 1.5 / 4 + 0.8 / 2), atol=1e-6, rtol=0)
    assert out.clip_fraction == pytest.approx(2 / 3)
    p = softmax_rows()
    torch.testing.assert_close(grad[0], -1 / 4 * (torch.tensor([1.0, 0.0, 0.0]) - p[0]), atol=1e-6, rtol=0)
    assert torch.equal(grad[1:], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        GRPOLossConfig(clip_ratio_c=1.0)


# -- GSPO sequence-level ratio -------------------------------------------------------------------
def test_segment_ids():
    assert segment_ids(torch.tensor([0, 3, 5], dtype=torch.int32), 7).tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert segment_ids(torch.tensor([0, 1, 2, 4]), 4).tolist() == [0, 1, 2, 2]


def test_gspo_hand_computed_forward_and_gradient():
    # Sequence 0 = tokens 0-2 (token 2 masked), sequence 1 = tokens 3-4; old log-probs 0.
    logp = torch.tensor([LN2, 0.0, 99.0, math.log(0.25), 0.0], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    segments = torch.tensor([0, 0, 0, 1, 1])
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.5, importance_level="sequence")
    loss, ratio, clipped, kl = variant_token_terms(logp, torch.zeros(5), None, adv, mask, cfg, segments)
    # s0 = exp((ln 2 + 0) / 2) = sqrt 2 < 1.5: loss -sqrt 2 per token; s1 = exp(ln(1/4) / 2) = 1/2,
    # A < 0: max(0.5, 0.8) = 0.8, clipped (constant).
    s2 = math.sqrt(2.0)
    torch.testing.assert_close(loss, torch.tensor([-s2, -s2, 0.0, 0.8, 0.8]), atol=1e-6, rtol=0)
    # Every position of a sequence shows its ratio (the masked one too; its loss is 0).
    torch.testing.assert_close(ratio, torch.tensor([s2, s2, s2, 0.5, 0.5]), atol=1e-6, rtol=0)
    assert clipped.tolist() == [False, False, False, True, True] and kl is None
    weights = torch.full((5,), 1 / 4)  # Eq. 8 over N = 2 sequences of 2 loss tokens each
    (loss * weights).sum().backward()
    # d/dlogp_t of sum_{t' in seq 0} w (-A s0) = (1/2) (-1) s0 / 2 = -sqrt 2 / 4 for its two tokens.
    torch.testing.assert_close(logp.grad, torch.tensor([-s2 / 4, -s2 / 4, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="needs segment_ids"):
        variant_token_terms(logp, torch.zeros(5), None, adv, mask, cfg)


def test_gspo_with_one_token_sequences_is_token_level():
    gen = torch.Generator().manual_seed(0)
    logp, old = torch.randn(7, generator=gen) * 0.3, torch.randn(7, generator=gen) * 0.3
    adv, mask = torch.randn(7, generator=gen), (torch.rand(7, generator=gen) > 0.3).float()
    token_cfg, seq_cfg = GRPOLossConfig(clip_ratio_c=3.0), GRPOLossConfig(clip_ratio_c=3.0, importance_level="sequence")
    a = variant_token_terms(logp, old, None, adv, mask, token_cfg)
    b = variant_token_terms(logp, old, None, adv, mask, seq_cfg, torch.arange(7))
    torch.testing.assert_close(a[0], b[0], atol=1e-7, rtol=0)


def gspo_loop_reference(logp, old, adv, mask, weights, lengths, clip_low, clip_high):
    """Zheng et al. 2025 Eq. 5-7, one packed sequence at a time with Python loops."""
    total, start = 0.0, 0
    for n in lengths:
        idx = [t for t in range(start, start + n) if mask[t] > 0]
        if idx:
            log_s = sum(logp[t] - old[t] for t in idx) / len(idx)
            s = torch.exp(log_s)
            a = float(adv[idx[0]])
            term = torch.maximum(-a * s, -a * s.clamp(1 - clip_low, 1 + clip_high))
            total = total + term * sum(float(weights[t]) for t in idx)
        start += n
    return total


@pytest.mark.parametrize("backend", kernel_backends("torch", "interpret"))
def test_gspo_odd_packed_row_matches_loop_reference(backend):
    # Sequences of 1, 3 and 2 positions plus 1 padding position, vocabulary 5, one masked token.
    lengths, vocab = [1, 3, 2, 1], 5
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, vocab, generator=gen)
    labels = torch.randint(0, vocab, (7,), generator=gen)
    old = torch.log_softmax(logits + 0.3 * torch.randn(7, vocab, generator=gen), -1).gather(1, labels[:, None])[:, 0]
    adv = torch.tensor([0.7, -1.3, -1.3, -1.3, 0.9, 0.9, 0.0])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    weights = torch.tensor([1 / 3, 1 / 6, 0.0, 1 / 6, 1 / 6, 1 / 6, 0.0])
    segments = segment_ids(torch.tensor([0, 1, 4, 6]), 7)  # the padding position joins the last sequence
    cfg = GRPOLossConfig(clip_low=0.1, clip_high=0.15, importance_level="sequence")
    leaf = logits.clone().requires_grad_()
    out = grpo_policy_loss(leaf, labels, old, None, adv, mask, weights, cfg, backend=backend, segment_ids=segments)
    out.loss.backward()
    ref_leaf = logits.clone().requires_grad_()
    logp = torch.log_softmax(ref_leaf, -1).gather(1, labels[:, None])[:, 0]
    expected = gspo_loop_reference(logp, old, adv, mask, weights, lengths, 0.1, 0.15)
    expected.backward()
    torch.testing.assert_close(out.loss, expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=1e-6, rtol=0)


def test_sequence_log_ratio_shape_error():
    with pytest.raises(ValueError, match="segment_ids must be"):
        sequence_log_ratio(torch.zeros(3), torch.ones(3), torch.zeros(2, dtype=torch.int64))


# -- Dr. GRPO ------------------------------------------------------------------------------------
def test_dr_grpo_advantages_without_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(rewards, std_normalize=False)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.75, -0.75, -0.75, 2.25]])
    assert torch.equal(adv, expected)  # r - mean is exact in fp32 here
    # The effective-group criterion still applies: group 0's std 0.577 is below 1.
    assert torch.equal(group_advantages(rewards, min_std=1.0, std_normalize=False)[0], torch.zeros(4))
    group = ScoredGroup([], [], {"total": np.array([1.0, 0.0, 0.0, 1.0])})
    assert group.advantages(0.0, std_normalize=False).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert np.array_equal(group.advantages(), group_advantages(rewards[:1].double())[0].numpy())


def test_dr_grpo_constant_length_normalizer():
    # Dr. GRPO: 1 / (C N) for every token, C = 8, N = 4.
    torch.testing.assert_close(token_weights(torch.tensor([2, 4]), "constant", 4, 10, 8), torch.tensor([1 / 32] * 2))
    with pytest.raises(ValueError, match="needs a length_constant >= 1"):
        token_weights(torch.tensor([2, 4]), "constant", 4, 10)
    assert GRPOLossConfig(normalization="constant").fused  # only the weights change


# -- configuration -------------------------------------------------------------------------------
def test_config_keys_documented_and_validated():
    docs = {name: doc for name, _, doc in field_docs()}
    for key in ("kl_estimator", "clip_ratio_c", "importance_level", "advantage_std_normalize",
                "normalization_constant"):
        assert docs[f"grpo.{key}"], key
    assert "clamped to +-20" in docs["grpo.kl_estimator"]
    for override, match in [("grpo.kl_estimator=k4", "grpo.kl_estimator"),
                            ("grpo.clip_ratio_c=1.0", "grpo.clip_ratio_c"),
                            ("grpo.importance_level=seq", "grpo.importance_level"),
                            ("grpo.normalization_constant=0", "grpo.normalization_constant"),
                            ("grpo.normalization=group", "grpo.normalization")]:
        with pytest.raises(ValueError, match=match):
            load_config(None, [override])
    cfg = load_config(None, ["grpo.advantage_std_normalize=false", "grpo.normalization=constant"])
    assert cfg.grpo.advantage_std_normalize is False and cfg.grpo.normalization_constant is None
