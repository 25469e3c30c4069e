"""The MPO step (Eq. 2-5) through Megatron's schedules equals a per-pair transformers
reference at TP=2, PP=2 and DP=2: the loss, its parts, the reward metrics and every gradient."""

import pytest
import torch

WORKER = "tests/distributed/workers/mpo_step_worker.py"
CONFIG = dict(beta=0.5, preference_weight=0.8, quality_weight=0.2, generation_weight=1.0)
DELTA = 0.15  # BCO's running mean from earlier steps


@pytest.fixture(scope="module")
def reference(tiny_qwen2, tmp_path_factory):
    """Pairs sharing a prompt, reference log-probs near the model's own, and Eq. 2 with
    its gradient computed pair by pair from transformers' Qwen2 (formulas written out here)."""
    model = tiny_qwen2["model"]
    vocab = tiny_qwen2["arch"].vocab_size
    gen = torch.Generator().manual_seed(11)
    beta = CONFIG["beta"]

    def sequence(prompt: torch.Tensor) -> dict:
        response = torch.randint(0, vocab, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen)
        tokens = torch.cat([prompt, response])
        labels = torch.full_like(tokens, -100)
        labels[len(prompt) - 1:-1] = response
        return {"tokens": tokens, "labels": labels}

    def summed_logp(s: dict) -> torch.Tensor:
        logits = model(s["tokens"][None]).logits[0].float()
        targets = s["labels"] != -100
        logp = torch.log_softmax(logits, -1).gather(1, s["labels"].clamp(min=0)[:, None])[:, 0]
        return (logp * targets).sum()

    pairs = []
    model.zero_grad()
    total, parts, margins = torch.zeros(()), [0.0, 0.0, 0.0], []
    for _ in range(5):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen)
        pair = {"chosen": sequence(prompt), "rejected": sequence(prompt)}
        lp_c, lp_r = summed_logp(pair["chosen"]), summed_logp(pair["rejected"])
        pair["ref_chosen"] = float(lp_c.detach()) + float(torch.randn(1, generator=gen))
        pair["ref_rejected"] = float(lp_r.detach()) + float(torch.randn(1, generator=gen))
        r_c, r_r = beta * (lp_c - pair["ref_chosen"]), beta * (lp_r - pair["ref_rejected"])
        l_p = -torch.nn.functional.logsigmoid(r_c - r_r)                                  # Eq. 3
        l_q = -torch.nn.functional.logsigmoid(r_c - DELTA) - torch.nn.functional.logsigmoid(DELTA - r_r)  # Eq. 4
        n_c = int((pair["chosen"]["labels"] != -100).sum())
        l_g = -lp_c / n_c                                                                  # Eq. 5
        total = total + (0.8 * l_p + 0.2 * l_q + 1.0 * l_g) / 5                            # Eq. 2, mean over pairs
        parts = [p + float(v.detach()) / 5 for p, v in zip(parts, (l_p, l_q, l_g))]
        margins.append(float((r_c - r_r).detach()))
        pairs.append(pair)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    root = tmp_path_factory.mktemp("mpo_cases")
    torch.save({"config": CONFIG, "delta": DELTA, "pairs": pairs}, root / "cases.pt")
    return {"loss": float(total.detach()), "parts": parts, "margins": margins, "grads": grads,
            "cases": root / "cases.pt"}


@pytest.mark.parametrize("layout", [("tp", 2), ("pp", 2), ("dp", 2)], ids=["tp2", "pp2", "dp2"])
def test_mpo_step_matches_per_pair_reference(run_step_worker, assert_grads_close, assert_mpo_result_matches,
                                             reference, tmp_path, layout):
    result, grads = run_step_worker(WORKER, layout, reference["cases"], tmp_path)
    assert_mpo_result_matches(result, reference)
    assert result["pairs"] == 5
    assert 0 < result["accuracy"] < 1  # the random reference offsets make both outcomes occur
    assert_grads_close(grads, reference["grads"])
