"""Fixtures of the distributed tests: a tiny random InternVL reference model."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from megatron_r1v.models.r1v.hf_config import transformers_internvl_config
from megatron_r1v.models.r1v.presets import get_preset

ARCH = get_preset("tiny-r1v")
IMG = ARCH.image_token_id
PER_TILE = ARCH.tokens_per_tile  # 4


def _text(n, gen):
    return torch.randint(0, IMG, (n,), generator=gen)  # never the image token


@pytest.fixture(scope="session")
def internvl(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    config = transformers.InternVLConfig(**transformers_internvl_config(ARCH))
    model = transformers.InternVLForConditionalGeneration._from_config(config, attn_implementation="eager")
    model = model.float().eval()
    with torch.no_grad():  # move every init-constant tensor (zeros, ones, 0.1) somewhere random
        for name, p in model.named_parameters():
            if any(k in name for k in ("norm", "bias", "lambda", "cls_token", "position_embeddings")):
                p.copy_(p + torch.randn_like(p) * 0.2)
    root = tmp_path_factory.mktemp("internvl")
    # In-memory state_dict names (model.vision_tower...) in one file, and the hub-format
    # directory transformers' save_pretrained writes (vision_tower...).
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    model.save_pretrained(root / "hf")

    gen = torch.Generator().manual_seed(1)
    seq = 40

    def image(tiles):
        return torch.full((tiles * PER_TILE,), IMG)

    samples = [
        _text(seq, gen),  # no image
        torch.cat([_text(5, gen), image(2), _text(seq - 5 - 2 * PER_TILE, gen)]),  # 1 image, 2 tiles
        torch.cat([_text(3, gen), image(1), _text(6, gen), image(3), _text(seq - 9 - 4 * PER_TILE, gen)]),  # 1 + 3
    ]
    n_tiles = 2 + 1 + 3
    side = ARCH.vision.image_size
    with_images = {
        "input_ids": torch.stack(samples),
        "labels": torch.randint(0, ARCH.decoder.vocab_size, (3, seq), generator=gen),
        "pixel_values": torch.randn(n_tiles, 3, side, side, generator=gen),
    }
    text_only = {
        "input_ids": torch.stack([_text(24, gen), _text(24, gen)]),
        "labels": torch.randint(0, ARCH.decoder.vocab_size, (2, 24), generator=gen),
        "pixel_values": None,
    }
    batches = [with_images, text_only]
    torch.save(batches, root / "batches.pt")

    reference = []
    for batch in batches:
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)).backward()
        grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                 for n, p in model.named_parameters() if n.startswith("model.multi_modal_projector.")}
        reference.append({"logits": logits.detach(), "grads": grads})
    return {"weights": root / "model.safetensors", "hf_dir": root / "hf", "batches": root / "batches.pt",
            "reference": reference, "root": root}


@pytest.fixture
def run_step_worker(torchrun, tiny_qwen2):
    """Runs a step worker (tests/distributed/workers/*_step_worker.py) on the tiny Qwen2 with
    one layout, ("tp" | "pp" | "dp", size); returns (result.json, gradients by HF name)."""
    import json

    from safetensors.torch import load_file

    def run(worker: str, layout: tuple, cases, out):
        kind, size = layout
        extra = [f"--{kind}", str(size)] if kind != "dp" else []
        torchrun(worker, size, ["--hf-file", str(tiny_qwen2["weights"]), "--cases", str(cases), "--out", str(out),
                                *extra])
        return json.loads((out / "result.json").read_text()), load_file(str(out / "grads.safetensors"))

    return run


@pytest.fixture
def assert_grads_close():
    """Gradients of a Megatron step against a reference's, name by name: fp32 throughout,
    packing, TP reductions and the fused kernels reorder sums (~1e-6 relative)."""

    def check(grads: dict, reference: dict):
        assert set(grads) == set(reference)
        scale = max(g.abs().max().item() for g in reference.values())
        assert scale > 0
        for name, ref in reference.items():
            torch.testing.assert_close(grads[name], ref, atol=2e-5 * scale, rtol=1e-4, msg=lambda m: f"{name}: {m}")

    return check


@pytest.fixture
def assert_mpo_result_matches():
    """An MPO step's result.json (``trainer.mpo_step.mpo_forward_backward``) against a per-pair
    reference {loss, parts, margins}: fp32 throughout; packing, TP reductions and the fused
    log-prob kernel reorder sums (~1e-6 relative)."""

    def check(result: dict, reference: dict):
        pairs = len(reference["margins"])
        assert result["pairs"] == pairs
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6)
        for got, want in zip((result["preference"], result["quality"], result["generation"]), reference["parts"]):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert result["reward_margin"] == pytest.approx(sum(reference["margins"]) / pairs, rel=1e-4, abs=1e-5)
        assert result["accuracy"] == pytest.approx(sum(m > 0 for m in reference["margins"]) / pairs)

    return check
