"""R1VModel vs transformers' InternVLForConditionalGeneration (CPU, gloo, fp32).

The tiny preset keeps every structural feature of R1V2: 3 vision heads (no TP > 1
divides them, so dummy heads are always in play), q/k RMSNorm over all heads, layer
scale, RMSNorm layers, exact GELU, pixel shuffle v2, an untied Qwen2 decoder whose
vocabulary (251) no TP divides.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

WORKER = "tests/distributed/workers/r1v_worker.py"

# fp32 everywhere; the only differences are summation orders in TP-split matmuls, the
# TP all-reduces (including the q/k-norm variance) and conv vs. matmul patch embedding:
# a few ulps on logits of size ~1 (measured <= 5e-7). 1e-4 keeps two orders of margin
# while any mapping or token-order error moves logits by >1e-2.
LOGIT_TOL = 1e-4
# Adapter gradients of a mean CE are ~1e-4..1e-2; same rounding sources.
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_logits_and_adapter_grads_match_transformers(tp, pp, tmp_path, internvl, torchrun):
    torchrun(WORKER, tp * pp, ["parity", "--hf-file", str(internvl["weights"]), "--data-file",
                               str(internvl["batches"]), "--tp", str(tp), "--pp", str(pp), "--out", str(tmp_path)])
    logits = load_file(str(tmp_path / "logits.safetensors"))
    grads = load_file(str(tmp_path / "grads.safetensors"))
    for i, ref in enumerate(internvl["reference"]):
        got = logits[f"logits_{i}"]
        assert got.shape == ref["logits"].shape
        diff = (got - ref["logits"]).abs().max().item()
        print(f"r1v parity tp={tp} pp={pp} batch {i}: max |logit diff| {diff:.3e}")  # shown with pytest -s
        assert diff <= LOGIT_TOL, f"tp={tp} pp={pp} batch {i}: max |logit diff| {diff:.3e}"
        for name, ref_grad in ref["grads"].items():
            torch.testing.assert_close(grads[f"grad_{i}.{name}"], ref_grad, atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                       msg=lambda m: f"batch {i} {name}: {m}")
    # The image batch trains the adapter; the text-only batch cannot.
    assert all(g.abs().max() > 0 for g in internvl["reference"][0]["grads"].values())
    assert all(g.abs().max() == 0 for g in internvl["reference"][1]["grads"].values())


def test_freeze_policies_grads_and_optimizer_state(tmp_path, internvl, torchrun):
    # TP=2: 3 vision heads become 4, so rank 1 holds a dummy head through a real step.
    torchrun(WORKER, 2, ["freeze", "--data-file", str(internvl["batches"]), "--tp", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "freeze.json").read_text())
    parts = {"adapter": ("adapter",), "adapter+llm": ("adapter", "language_model"),
             "adapter+vision": ("adapter", "vision"), "all": ("adapter", "language_model", "vision")}
    for policy, trainable_parts in parts.items():
        r = report[policy]
        expected = sorted(n for n in r["all"] if n.split(".")[0] in trainable_parts)
        assert sorted(r["trainable"]) == expected, policy
        assert sorted(r["with_grad"]) == expected, policy
        assert sorted(r["in_optimizer"]) == expected, policy
        assert sorted(r["with_state"]) == expected, policy
        # Dummy heads have zero weights and provably zero gradients: they stay exactly zero
        # even when the vision tower trains (lr 1e-2, Adam).
        assert r["dummy_entries"] > 0 and r["dummy_max_abs"] == 0.0, (policy, r["dummy_max_abs"])
    assert all(n.startswith("adapter.") for n in report["adapter"]["trainable"])
