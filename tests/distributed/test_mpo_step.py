"""The MPO step (Eq. 2-5) through Megatron's schedules equals a per-pair transformers
reference at TP=2, PP=2 and DP=2: the loss, its parts, the reward metrics and every gradient;
also with the InternVL/TRL options (``mpo.nll_normalization=token``, ``mpo.bco_delta=
trl_running_mean``), whose "batch" is the whole step across micro-batches and DP ranks."""

import pytest
import torch
import torch.nn.functional as F

WORKER = "tests/distributed/workers/mpo_step_worker.py"
OPTIONS_WORKER = "tests/distributed/workers/mpo_options_worker.py"
CONFIG = dict(beta=0.5, preference_weight=0.8, quality_weight=0.2, generation_weight=1.0)
DELTA = 0.15  # BCO's running mean from earlier steps
PAST = {"mean": 0.15, "count": 30}  # the running mean before the step, for trl_running_mean
LAYOUTS = [("tp", 2), ("pp", 2), ("dp", 2)]


def _pairs(tiny_qwen2) -> list[dict]:
    """5 pairs sharing a prompt each, odd response lengths, reference log-probs near the model's own."""
    model, vocab = tiny_qwen2["model"], tiny_qwen2["arch"].vocab_size
    gen = torch.Generator().manual_seed(11)

    def sequence(prompt: torch.Tensor) -> dict:
        response = torch.randint(0, vocab, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen)
        tokens = torch.cat([prompt, response])
        labels = torch.full_like(tokens, -100)
        labels[len(prompt) - 1:-1] = response
        return {"tokens": tokens, "labels": labels}

    pairs = []
    for _ in range(5):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen)
        pair = {"chosen": sequence(prompt), "rejected": sequence(prompt)}
        with torch.no_grad():
            lp_c, lp_r = _summed_logp(model, pair["chosen"]), _summed_logp(model, pair["rejected"])
        pair["ref_chosen"] = float(lp_c) + float(torch.randn(1, generator=gen))
        pair["ref_rejected"] = float(lp_r) + float(torch.randn(1, generator=gen))
        pairs.append(pair)
    return pairs


def _summed_logp(model, s: dict) -> torch.Tensor:
    logits = model(s["tokens"][None]).logits[0].float()
    targets = s["labels"] != -100
    logp = torch.log_softmax(logits, -1).gather(1, s["labels"].clamp(min=0)[:, None])[:, 0]
    return (logp * targets).sum()


def _reference(tiny_qwen2, pairs: list[dict], nll: str, trl_delta: bool) -> dict:
    """Eq. 2 over the step with its gradient, from transformers' Qwen2 (formulas written out
    here): NLL per pair (``pair``) or the step's token mean (``token``); delta DELTA, or the
    mean of PAST's rewards and this step's (trl_running_mean)."""
    model, beta, n = tiny_qwen2["model"], CONFIG["beta"], len(pairs)
    model.zero_grad()
    lp_c = torch.stack([_summed_logp(model, p["chosen"]) for p in pairs])
    lp_r = torch.stack([_summed_logp(model, p["rejected"]) for p in pairs])
    r_c = beta * (lp_c - torch.tensor([p["ref_chosen"] for p in pairs]))
    r_r = beta * (lp_r - torch.tensor([p["ref_rejected"] for p in pairs]))
    lengths = torch.tensor([float((p["chosen"]["labels"] != -100).sum()) for p in pairs])
    rewards = torch.cat([r_c, r_r]).detach().double()
    delta = float((PAST["mean"] * PAST["count"] + rewards.sum()) / (PAST["count"] + 2 * n)) if trl_delta else DELTA
    l_p = -F.logsigmoid(r_c - r_r)                                                        # Eq. 3
    l_q = -F.logsigmoid(r_c - delta) - F.logsigmoid(delta - r_r)                          # Eq. 4
    l_g = (-lp_c / lengths).mean() if nll == "pair" else -lp_c.sum() / lengths.sum()      # Eq. 5
    total = 0.8 * l_p.mean() + 0.2 * l_q.mean() + 1.0 * l_g                               # Eq. 2
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return {"loss": float(total.detach()), "parts": [float(v.detach().mean()) for v in (l_p, l_q, l_g)],
            "margins": (r_c - r_r).detach().tolist(), "grads": grads, "delta": delta,
            "reward_sum": float(rewards.sum())}


@pytest.fixture(scope="module")
def pairs(tiny_qwen2):
    return _pairs(tiny_qwen2)


@pytest.fixture(scope="module")
def reference(tiny_qwen2, pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("mpo_cases")
    torch.save({"config": CONFIG, "delta": DELTA, "pairs": pairs}, root / "cases.pt")
    return {**_reference(tiny_qwen2, pairs, "pair", trl_delta=False), "cases": root / "cases.pt"}


@pytest.fixture(scope="module")
def reference_trl(tiny_qwen2, pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("mpo_trl_cases")
    torch.save({"config": {**CONFIG, "nll_normalization": "token"}, "bco_delta": "trl_running_mean", "past": PAST,
                "pairs": pairs}, root / "cases.pt")
    return {**_reference(tiny_qwen2, pairs, "token", trl_delta=True), "cases": root / "cases.pt"}


@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp2", "pp2", "dp2"])
def test_mpo_step_matches_per_pair_reference(run_step_worker, assert_grads_close, assert_mpo_result_matches,
                                             reference, tmp_path, layout):
    result, grads = run_step_worker(WORKER, layout, reference["cases"], tmp_path)
    assert_mpo_result_matches(result, reference)
    assert result["pairs"] == 5
    assert 0 < result["accuracy"] < 1  # the random reference offsets make both outcomes occur
    assert_grads_close(grads, reference["grads"])


@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp2", "pp2", "dp2"])
def test_trl_options_match_step_reference(run_step_worker, assert_grads_close, assert_mpo_result_matches,
                                          reference_trl, tmp_path, layout):
    """Token-mean NLL and the delta folded from this step's rewards (a forward-only pre-pass)
    over a step split into rows and DP shards equal the whole step computed at once."""
    result, grads = run_step_worker(OPTIONS_WORKER, layout, reference_trl["cases"], tmp_path)
    assert result["reward_count"] == 10
    assert result["reward_sum"] == pytest.approx(reference_trl["reward_sum"], rel=1e-5, abs=1e-6)
    assert result["delta"] == pytest.approx(reference_trl["delta"], rel=1e-6, abs=1e-7)
    assert_mpo_result_matches(result, reference_trl)
    assert result["microbatches"] > 1 or layout[0] == "dp"  # the token mean spans rows / ranks
    assert_grads_close(grads, reference_trl["grads"])
