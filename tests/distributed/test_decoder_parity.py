"""Megatron Qwen2 decoder vs transformers' Qwen2ForCausalLM under TP and PP (CPU, gloo, fp32)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

WORKER = "tests/distributed/workers/decoder_worker.py"

# fp32 on both sides with the same op order except for TP-split matmuls and the
# all-reduce summation order: differences are a few ulps of logits of size ~1
# (measured 2.4e-7), so 1e-4 leaves two orders of margin while still catching any
# mapping error (a swapped head or missing bias moves logits by >1e-2).
LOGIT_TOL = 1e-4
# Gradients of a mean CE over 128 tokens are ~1e-3..1e-1; the same rounding sources
# give ~1e-7 absolute differences (measured), far below any mapping error.
GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def hf_reference(tiny_qwen2):
    model = tiny_qwen2["model"]
    data = torch.load(tiny_qwen2["data"])
    tokens, labels = data[:4, :-1], data[:4, 1:]
    model.zero_grad()
    logits = model(tokens).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    # The worker reads the first 4 rows.
    torch.save(data[:4], tiny_qwen2["root"] / "data4.pt")
    return {"logits": logits.detach(), "loss": loss.item(), "grads": grads, "data": tiny_qwen2["root"] / "data4.pt"}


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_logits_and_grads_match_transformers(tp, pp, tmp_path, tiny_qwen2, hf_reference, torchrun):
    torchrun(WORKER, tp * pp, ["parity", "--hf-file", str(tiny_qwen2["weights"]), "--data-file",
                               str(hf_reference["data"]), "--tp", str(tp), "--pp", str(pp), "--out", str(tmp_path)])
    logits = torch.load(tmp_path / "logits.pt")
    assert logits.shape == hf_reference["logits"].shape
    diff = (logits - hf_reference["logits"]).abs().max().item()
    print(f"decoder parity tp={tp} pp={pp}: max |logit diff| {diff:.3e}")  # shown with pytest -s
    assert diff <= LOGIT_TOL, f"tp={tp} pp={pp}: max |logit diff| {diff:.3e}"

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["loss"] == pytest.approx(hf_reference["loss"], abs=1e-5)

    grads = load_file(str(tmp_path / "grads.safetensors"))
    assert set(grads) == set(hf_reference["grads"]), "gradient names differ from the HF model's"
    for name, ref in hf_reference["grads"].items():
        assert ref.abs().max() > 0, f"reference grad {name} is zero: the test would be vacuous"
        torch.testing.assert_close(grads[name], ref, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda m: f"{name}: {m}")


def test_checkpoint_errors_name_the_tensor(tmp_path, tiny_qwen2, torchrun):
    torchrun(WORKER, 2, ["errors", "--hf-file", str(tiny_qwen2["weights"]), "--data-file", str(tiny_qwen2["data"]),
                         "--tp", "2", "--out", str(tmp_path)])
    errors = json.loads((tmp_path / "errors.json").read_text())
    assert "HF checkpoint has no tensor 'model.layers.1.mlp.up_proj.weight'" in errors["missing"]
    assert "decoder.layers.1.mlp.linear_fc1.weight" in errors["missing"]
    # o_proj is row-parallel: 62 columns do not split into the 2 x 32 the model expects.
    assert "decoder.layers.2.self_attention.linear_proj.weight" in errors["shape"]
    assert "'model.layers.2.self_attn.o_proj.weight': (64, 62)" in errors["shape"]
