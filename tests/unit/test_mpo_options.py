"""The InternVL/TRL options of MPO (``mpo.bco_delta``, ``mpo.nll_normalization``) against an
independent plain-torch reference written here: loss values and gradients, odd lengths,
a step split into micro-batches, BCO's delta against TRL's ``RunningMoments`` arithmetic,
and the config checks. ``-s -k measured`` prints the numbers of docs/benchmarks.md."""

import dataclasses
import typing

import pytest
import torch

from megatron_r1v.config import MPOConfig, RunConfig, load_config
from megatron_r1v.losses.mpo import (
    BCO_DELTAS,
    NLL_NORMALIZATIONS,
    MPOLossConfig,
    RewardMean,
    bco_delta,
    generation_loss,
    mpo_loss,
    mpo_pair_losses,
)
from megatron_r1v.validation import validate_config

BETA, W_P, W_Q, W_G = 0.3, 0.8, 0.2, 1.0


def _neg_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(-x))  # -log(1 / (1 + e^-x)); the inputs here are small


def reference_loss(pc, pr, rc, rr, lengths, delta: float, nll: str) -> torch.Tensor:
    """Eq. 2-5 over a batch, from the definitions: rewards, DPO, BCO with ``delta``, and the
    NLL per pair (``pair``) or as the batch's token mean (``token``, TRL's cross-entropy)."""
    r_c, r_r = BETA * (pc - rc), BETA * (pr - rr)
    l_p = _neg_log_sigmoid(r_c - r_r).mean()
    l_q = (_neg_log_sigmoid(r_c - delta) + _neg_log_sigmoid(-(r_r - delta))).mean()
    lengths = lengths.to(pc.dtype)
    l_g = (-pc / lengths).mean() if nll == "pair" else (-pc).sum() / lengths.sum()
    return W_P * l_p + W_Q * l_q + W_G * l_g


class TRLRunningMoments:
    """TRL's ``RunningMoments.update`` (trl/trainer/utils.py, v0.11-v0.28) for one process:
    mean 0, count 1e-24, and each update one batch's mean reward (a 0-d tensor, count 1)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs_mean: float) -> None:
        xs_count, xs_var = 1, 0.0
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot_count
        self.mean += delta * xs_count / tot_count
        self.var, self.count = (old_sum + xs_var * xs_count) / tot_count, tot_count


def _batch(n: int, seed: int, lengths: list[int]):
    gen = torch.Generator().manual_seed(seed)
    logp = [-(torch.rand(n, generator=gen, dtype=torch.float64) * 30 + 1) for _ in range(4)]
    return (*logp, torch.tensor(lengths))


CFG = {nll: MPOLossConfig(beta=BETA, preference_weight=W_P, quality_weight=W_Q, generation_weight=W_G,
                          nll_normalization=nll) for nll in ("pair", "token")}


@pytest.mark.parametrize("nll", ["pair", "token"])
@pytest.mark.parametrize("delta", [0.0, -0.37, 1.5])
def test_loss_and_gradients_match_reference(nll, delta):
    pc, pr, rc, rr, lengths = _batch(5, 3, [3, 50, 7, 1, 13])  # odd lengths, one of 1
    ours = [t.clone().requires_grad_() for t in (pc, pr)]
    theirs = [t.clone().requires_grad_() for t in (pc, pr)]
    out = mpo_loss(*ours, rc, rr, lengths, CFG[nll], delta)
    ref = reference_loss(*theirs, rc, rr, lengths, delta, nll)
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def test_token_mean_of_a_step_split_into_micro_batches():
    """The trainer evaluates a step micro-batch by micro-batch (and DP shard by shard): per-pair
    terms with the step's mean chosen length average to the step's token mean, gradients too."""
    pc, pr, rc, rr, lengths = _batch(7, 5, [9, 1, 33, 5, 17, 3, 71])
    whole = pc.clone().requires_grad_()
    reference_loss(whole, pr, rc, rr, lengths, 0.2, "token").backward()
    part_grads, total = [], 0.0
    mean_length = float(lengths.double().mean())
    for rows in ([0, 1, 2], [3], [4, 5, 6]):
        piece = pc[rows].clone().requires_grad_()
        terms = mpo_pair_losses(piece, pr[rows], rc[rows], rr[rows], lengths[rows], CFG["token"], 0.2, mean_length)
        (terms.loss.sum() / 7).backward()
        total += float(terms.loss.detach().sum()) / 7
        part_grads.append(piece.grad)
    assert total == pytest.approx(float(reference_loss(pc, pr, rc, rr, lengths, 0.2, "token")), rel=1e-12)
    torch.testing.assert_close(torch.cat(part_grads), whole.grad, rtol=1e-12, atol=1e-15)
    # Each micro-batch's own token mean (no step length) is a different, layout-dependent loss.
    alone = mpo_pair_losses(pc[[0, 1, 2]], pr[[0, 1, 2]], rc[[0, 1, 2]], rr[[0, 1, 2]], lengths[[0, 1, 2]],
                            CFG["token"], 0.2)
    assert not torch.allclose(alone.generation, generation_loss(pc[[0, 1, 2]], lengths[[0, 1, 2]], "token",
                                                                mean_length))


def test_bco_delta_modes_over_steps_match_trl_running_moments():
    """Three steps of 2 pairs: ``running_mean`` reads the earlier steps' rewards, ``trl_running_mean``
    folds the step in first (TRL <= 0.28 with one batch per step), ``zero`` is 0 (TRL >= 0.29)."""
    steps = [torch.tensor(r, dtype=torch.float64) for r in  # chosen and rejected rewards of each step
             ([0.9, -0.3, 0.1, -0.5], [1.4, 0.2, -0.2, -1.1], [0.6, 0.6, -0.9, 0.0])]
    state, trl, seen = RewardMean(), TRLRunningMoments(), []
    for rewards in steps:
        before = RewardMean(state.mean, state.count)
        trl.update(float(rewards.mean()))
        assert bco_delta("running_mean", state) == pytest.approx(float(torch.cat(seen).mean()) if seen else 0.0)
        assert bco_delta("trl_running_mean", state, float(rewards.sum()), 4) == pytest.approx(trl.mean, rel=1e-12)
        assert bco_delta("zero", state, float(rewards.sum()), 4) == 0.0
        assert state == before  # reading a delta never changes the running mean
        state.update(rewards)  # the trainer folds every step in afterwards, whatever the mode
        seen.append(rewards)


def test_measured_values():
    """The numbers of docs/benchmarks.md (printed with -s)."""
    lengths, nll = torch.tensor([3, 50]), torch.tensor([6.0, 25.0], dtype=torch.float64)
    pair = float(generation_loss(-nll, lengths, "pair").mean())
    token = float(generation_loss(-nll, lengths, "token").mean())
    assert pair == pytest.approx(1.25) and token == pytest.approx(31 / 53)
    print(f"\nNLL, lengths 3 and 50, NLLs 6 and 25: pair {pair:.4f}, token {token:.4f}")
    # A step's 4 chosen and 4 rejected rewards (mean 0.0625) after step 1 (policy = reference:
    # 8 rewards of 0) and after 100 steps of 4 pairs whose rewards averaged -0.02.
    step = torch.tensor([0.9, -0.3, 0.1, -0.5, 1.4, 0.2, -0.2, -1.1], dtype=torch.float64)
    r_c, r_r = step[:4], step[4:]
    for mode in ("running_mean", "trl_running_mean", "zero"):
        cells = []
        for past in (RewardMean(0.0, 8), RewardMean(-0.02, 800)):
            delta = bco_delta(mode, past, float(step.sum()), 8)
            quality = float((_neg_log_sigmoid(r_c - delta) + _neg_log_sigmoid(-(r_r - delta))).mean())
            cells.append(f"delta {delta:+.5f} (BCO loss {quality:.5f})")
        print(f"{mode}: step 2 {cells[0]}; step 101 {cells[1]}")


def test_config_choices_are_the_loss_modules():
    hints = typing.get_type_hints(MPOConfig)
    assert typing.get_args(hints["bco_delta"]) == BCO_DELTAS
    assert typing.get_args(hints["nll_normalization"]) == NLL_NORMALIZATIONS
    assert (MPOConfig().bco_delta, MPOConfig().nll_normalization) == ("running_mean", "pair")  # ours by default


def test_option_errors_name_the_key():
    with pytest.raises(ValueError, match=r"config key 'mpo.bco_delta': 'mean' is not one of"):
        load_config(None, ["mpo.bco_delta=mean"])
    with pytest.raises(ValueError, match=r"config key 'mpo.nll_normalization': 'tokens' is not one of"):
        load_config(None, ["mpo.nll_normalization=tokens"])
    cfg = RunConfig()  # built in code: the validation names the key
    with pytest.raises(ValueError, match=r"mpo.bco_delta must be one of running_mean, trl_running_mean, zero"):
        validate_config(dataclasses.replace(cfg, mpo=dataclasses.replace(cfg.mpo, bco_delta="trl")))
    with pytest.raises(ValueError, match=r"mpo.nll_normalization must be one of pair, token, got 'sum'"):
        validate_config(dataclasses.replace(cfg, mpo=dataclasses.replace(cfg.mpo, nll_normalization="sum")))
    loaded = load_config(None, ["mpo.bco_delta=trl_running_mean", "mpo.nll_normalization=token"])
    assert (loaded.mpo.bco_delta, loaded.mpo.nll_normalization) == ("trl_running_mean", "token")
    with pytest.raises(ValueError, match="nll_normalization must be one of pair, token, got 'x'"):
        MPOLossConfig(nll_normalization="x")
    with pytest.raises(ValueError, match=r"mean_chosen_length must be >= 1, got 0.5"):
        generation_loss(torch.zeros(2), torch.tensor([1, 2]), "token", 0.5)
    with pytest.raises(ValueError, match=r"trl_running_mean needs the step's rewards"):
        bco_delta("trl_running_mean", RewardMean())
    with pytest.raises(ValueError, match="bco_delta must be one of"):
        bco_delta("ema", RewardMean())
