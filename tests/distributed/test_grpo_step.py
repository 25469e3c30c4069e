"""GRPO forward/backward on Megatron (packed rows, fused vocab-parallel loss, schedules)
against transformers' Qwen2 run sample by sample with the loss written in plain torch."""


import pytest
import torch

WORKER = "tests/distributed/workers/grpo_step_worker.py"
CONFIG = dict(clip_low=0.2, clip_high=0.28, kl_beta=0.05, temperature=1.0, normalization="sequence")


@pytest.fixture(scope="module")
def reference(tiny_qwen2, tmp_path_factory):
    """Samples with prompt/response splits, behaviour and reference log-probs near the
    model's own, and the Eq. 8 loss + gradients computed independently per sample."""
    model = tiny_qwen2["model"]
    vocab = tiny_qwen2["arch"].vocab_size
    gen = torch.Generator().manual_seed(5)
    samples = []
    for i in range(6):
        length = int(torch.randint(9, 21, (1,), generator=gen))
        prompt = int(torch.randint(3, 7, (1,), generator=gen))
        tokens = torch.randint(0, vocab, (length,), generator=gen)
        labels = torch.full((length,), -100)
        labels[prompt - 1:-1] = tokens[prompt:]
        samples.append({"tokens": tokens, "labels": labels, "adv": float(torch.randn(1, generator=gen))})
    model.zero_grad()
    total = torch.zeros(())
    for s in samples:
        logits = model(s["tokens"][None]).logits[0]
        targets = s["labels"] != -100
        logp = torch.log_softmax(logits.float(), -1).gather(1, s["labels"].clamp(min=0)[:, None])[:, 0]
        with torch.no_grad():
            s["old"] = torch.where(targets, logp + 0.3 * torch.randn(logp.shape, generator=gen), 0.0)
            s["ref"] = torch.where(targets, logp + 0.2 * torch.randn(logp.shape, generator=gen), 0.0)
        ratio = torch.exp(logp - s["old"])
        surrogate = torch.maximum(-s["adv"] * ratio, -s["adv"] * ratio.clamp(0.8, 1.28))
        diff = s["ref"] - logp
        per_token = surrogate + 0.05 * (diff.exp() - diff - 1)
        # Eq. 8: mean over each response, then over the 6 responses.
        total = total + (per_token * targets).sum() / targets.sum() / len(samples)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    root = tmp_path_factory.mktemp("grpo_cases")
    torch.save({"config": CONFIG, "samples": samples}, root / "cases.pt")
    return {"loss": float(total.detach()), "grads": grads, "cases": root / "cases.pt"}


@pytest.mark.parametrize("layout", [("tp", 2), ("pp", 2), ("dp", 2)], ids=["tp2", "pp2", "dp2"])
def test_grpo_step_matches_per_sample_reference(run_step_worker, assert_grads_close, reference, tmp_path, layout):
    result, grads = run_step_worker(WORKER, layout, reference["cases"], tmp_path)
    # fp32 throughout; packing, TP reductions and the fused kernel reorder sums: ~1e-6 relative.
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6)
    assert 0.0 < result["clip_fraction"] < 1.0 and result["kl"] > 0
    assert_grads_close(grads, reference["grads"])
