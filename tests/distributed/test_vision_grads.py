"""Gradients of every vision parameter (and of the adapter and decoder) of R1VModel against
transformers' InternVLForConditionalGeneration, at TP=1, TP=2 (3 vision heads padded to 4:
a dummy head) and PP=2 (vision on stage 0, the loss on stage 1, backward through 1F1B),
for rows with images of 1, 2 and 3 tiles; and one MPO forward/backward with
``model.freeze=all`` on packed chosen/rejected pairs with images against a per-pair
transformers reference whose loss (Eq. 2-5) is written out here in plain torch.

The reference model is the session's tiny random InternVL (tests/distributed/conftest.py,
norms, biases, layer scales, class token and positions moved off their init values)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from megatron_r1v.models.r1v.hf_config import transformers_internvl_config
from megatron_r1v.models.r1v.presets import get_preset

WORKER = "tests/distributed/workers/vision_grads_worker.py"
ARCH = get_preset("tiny-r1v")
IMG = ARCH.image_token_id
PER_TILE = ARCH.tokens_per_tile  # 4 visual tokens per 56px tile
SIDE = ARCH.vision.image_size
PARTS = {"vision": "model.vision_tower.", "adapter": "model.multi_modal_projector."}  # anything else: decoder
# fp32 on both sides; what differs is summation order (TP-split matmuls and their
# all-reduces, the q/k-norm variance all-reduced over TP, Megatron's vs transformers' attention,
# gradients accumulated over micro-batches and over packed segments, the fused log-prob
# kernel). Largest |gradient| per part: vision ~1.6e-3, adapter ~2e-2..6e-2, decoder
# ~9e-2..0.55. Measured worst |diff| over all layouts: 4.5e-7 (LM) and 7.7e-7 (MPO) x the
# largest |gradient| of the same part. ATOL 1e-5 x that scale keeps >10x margin, while
# bugs move vision gradients by 1e-3 x scale and more (tried at TP=2: q/k-norm variance
# all-reduced without the backward all-reduce: 1.5e-3; divided by the padded width: 2.6e-3).
GRAD_ATOL_VS_SCALE, GRAD_RTOL = 1e-5, 1e-4
MPO = dict(beta=0.5, preference_weight=0.8, quality_weight=0.2, generation_weight=1.0)
DELTA = 0.15  # BCO's running mean of earlier rewards


def _text(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, IMG, (n,), generator=gen)  # never the image token


def _part(name: str) -> str:
    return next((part for part, prefix in PARTS.items() if name.startswith(prefix)), "decoder")


@pytest.fixture(scope="module")
def hf_model(internvl):
    """The session's InternVL reference, rebuilt from its saved in-memory state dict."""
    import transformers

    config = transformers.InternVLConfig(**transformers_internvl_config(ARCH))
    model = transformers.InternVLForConditionalGeneration._from_config(config, attn_implementation="eager")
    model.load_state_dict(load_file(str(internvl["weights"])), strict=True)
    return model.float().eval()


def all_grads(model) -> dict:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


@pytest.fixture(scope="module")
def lm_reference(hf_model, tmp_path_factory):
    """Three rows of 24 tokens, with one image of 1, 2 and 3 tiles; the mean over rows of
    each row's token-mean CE (the schedule's loss, one micro-batch per row) and every
    parameter's gradient from transformers."""
    gen = torch.Generator().manual_seed(7)
    seq, rows = 24, []
    for tiles in (1, 2, 3):
        before = 2 + tiles
        ids = torch.cat([_text(before, gen), torch.full((tiles * PER_TILE,), IMG),
                         _text(seq - before - tiles * PER_TILE, gen)])
        rows.append({"tokens": ids, "labels": torch.randint(0, ARCH.decoder.vocab_size, (seq,), generator=gen),
                     "pixel_values": torch.randn(tiles, 3, SIDE, SIDE, generator=gen)})
    hf_model.zero_grad()
    logits = hf_model(input_ids=torch.stack([r["tokens"] for r in rows]),
                      pixel_values=torch.cat([r["pixel_values"] for r in rows])).logits
    # Rows have one length, so the mean over all tokens is the mean of the row means.
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.stack([r["labels"] for r in rows]).reshape(-1))
    loss.backward()
    root = tmp_path_factory.mktemp("vision_lm")
    torch.save({"rows": rows}, root / "cases.pt")
    return {"loss": float(loss.detach()), "grads": all_grads(hf_model), "cases": root / "cases.pt"}


def assert_grads_match(grads: dict, reference: dict, label: str) -> None:
    """Every gradient against the reference, scale taken per part; prints each part's
    max |diff| / max |reference| (shown with pytest -s)."""
    assert set(grads) == set(reference), (sorted(set(grads) ^ set(reference)))[:10]
    scale = {part: max(g.abs().max().item() for n, g in reference.items() if _part(n) == part) for part in
             ("vision", "adapter", "decoder")}
    worst = dict.fromkeys(scale, 0.0)
    for name, ref in reference.items():
        part = _part(name)
        assert scale[part] > 0, part
        worst[part] = max(worst[part], (grads[name] - ref).abs().max().item() / scale[part])
        torch.testing.assert_close(grads[name], ref, atol=GRAD_ATOL_VS_SCALE * scale[part], rtol=GRAD_RTOL,
                                   msg=lambda m: f"{label} {name}: {m}")
    print(f"{label}: gradient scale per part {scale}, max |diff| / scale {worst}")


def assert_every_vision_param_trains(reference: dict) -> None:
    """Each vision tensor's reference gradient is non-zero, so matching it means something."""
    vision = {n: g for n, g in reference.items() if _part(n) == "vision"}
    # patch embedding (2) + class token + positions, and 15 tensors per layer (q, k, v
    # separate in transformers' layout).
    assert len(vision) == 4 + 15 * ARCH.vision.num_layers
    assert all(g.abs().max() > 0 for g in vision.values()), [n for n, g in vision.items() if g.abs().max() == 0]


LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
# TP=2 pads the 3 heads to 4: rank 1's second head is a dummy. Per layer it has q/k/v rows
# (3 x 8 x 24), 8 q-norm and 8 k-norm entries and 24 x 8 projection columns. Its gradient
# must be exactly zero (zero weights on every path into and out of it), not just small.
_D, _H = ARCH.vision.head_dim, ARCH.vision.hidden_size
DUMMY_ENTRIES_TP2 = ARCH.vision.num_layers * (3 * _D * _H + 2 * _D + _H * _D)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vision_grads_match_transformers(layout, lm_reference, internvl, torchrun, tmp_path):
    tp, pp = LAYOUTS[layout]
    torchrun(WORKER, tp * pp, ["lm", "--hf-file", str(internvl["weights"]), "--cases", str(lm_reference["cases"]),
                               "--tp", str(tp), "--pp", str(pp), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["microbatches"] == 3
    assert result["loss"] == pytest.approx(lm_reference["loss"], rel=1e-5)  # a mean CE of ~5.5 in fp32
    assert_every_vision_param_trains(lm_reference["grads"])
    assert_grads_match(load_file(str(tmp_path / "grads.safetensors")), lm_reference["grads"], f"lm {layout}")
    assert (result["dummy_entries"], result["dummy_grad_max_abs"]) == (DUMMY_ENTRIES_TP2 if tp == 2 else 0, 0.0)


def _pair(gen: torch.Generator, tiles: int) -> dict:
    """A prompt (text, an image of ``tiles`` tiles, text) with two random responses; labels
    hold the response tokens at the positions that predict them."""
    prompt = torch.cat([_text(2, gen), torch.full((tiles * PER_TILE,), IMG), _text(2, gen)])
    pair = {"tiles": tiles, "prompt_len": len(prompt),
            "pixel_values": torch.randn(tiles, 3, SIDE, SIDE, generator=gen) if tiles else None}
    for side in ("chosen", "rejected"):
        response = _text(int(torch.randint(3, 9, (1,), generator=gen)), gen)
        tokens = torch.cat([prompt, response])
        labels = torch.full_like(tokens, -100)
        labels[len(prompt) - 1:-1] = response
        pair[side] = {"tokens": tokens, "labels": labels}
    return pair


def _summed_logp(model, seq: dict, pixel_values) -> torch.Tensor:
    """log pi(response | prompt, image) from transformers: one sequence, one forward."""
    logits = model(input_ids=seq["tokens"][None], pixel_values=pixel_values).logits[0].float()
    targets = seq["labels"] != -100
    logp = torch.log_softmax(logits, -1).gather(1, seq["labels"].clamp(min=0)[:, None])[:, 0]
    return (logp * targets).sum()


def _mpo_terms(lp_c, lp_r, ref_c: float, ref_r: float, n_chosen: int) -> tuple:
    """Eq. 3, 4, 5 for one pair, and its reward margin, written out from the report."""
    beta = MPO["beta"]
    r_c, r_r = beta * (lp_c - ref_c), beta * (lp_r - ref_r)
    preference = -F.logsigmoid(r_c - r_r)                                     # Eq. 3, DPO
    quality = -F.logsigmoid(r_c - DELTA) - F.logsigmoid(-(r_r - DELTA))       # Eq. 4, BCO
    generation = -lp_c / n_chosen                                             # Eq. 5, NLL / |y_c|
    return preference, quality, generation, float((r_c - r_r).detach())


@pytest.fixture(scope="module")
def mpo_reference(hf_model, tmp_path_factory):
    """Five pairs whose prompts hold images of 1, 2, 3, 2 tiles and none, reference
    log-probs near the model's own, and Eq. 2 (mean over pairs) with every parameter's
    gradient, computed pair by pair from transformers."""
    gen = torch.Generator().manual_seed(13)
    weights = (MPO["preference_weight"], MPO["quality_weight"], MPO["generation_weight"])
    pairs, total, parts, margins = [], torch.zeros(()), [0.0, 0.0, 0.0], []
    hf_model.zero_grad()
    for tiles in (1, 2, 3, 2, 0):
        pair = _pair(gen, tiles)
        lp_c = _summed_logp(hf_model, pair["chosen"], pair["pixel_values"])
        lp_r = _summed_logp(hf_model, pair["rejected"], pair["pixel_values"])
        pair["ref_chosen"] = float(lp_c.detach()) + float(torch.randn(1, generator=gen))
        pair["ref_rejected"] = float(lp_r.detach()) + float(torch.randn(1, generator=gen))
        n_chosen = int((pair["chosen"]["labels"] != -100).sum())
        *terms, margin = _mpo_terms(lp_c, lp_r, pair["ref_chosen"], pair["ref_rejected"], n_chosen)
        total = total + sum(w * t for w, t in zip(weights, terms)) / 5                   # Eq. 2
        parts = [p + float(t.detach()) / 5 for p, t in zip(parts, terms)]
        margins.append(margin)
        pairs.append(pair)
    total.backward()
    root = tmp_path_factory.mktemp("vision_mpo")
    torch.save({"config": MPO, "delta": DELTA, "pairs": pairs}, root / "cases.pt")
    return {"loss": float(total.detach()), "parts": parts, "margins": margins, "grads": all_grads(hf_model),
            "cases": root / "cases.pt"}


MPO_LAYOUTS = {"tp2": ("--tp", 2), "pp2": ("--pp", 2), "dp2": (None, 2)}


@pytest.mark.parametrize("layout", MPO_LAYOUTS)
def test_mpo_step_with_images_and_freeze_all_matches_per_pair_reference(layout, mpo_reference, internvl, torchrun,
                                                                        assert_mpo_result_matches, tmp_path):
    flag, size = MPO_LAYOUTS[layout]
    torchrun(WORKER, size, ["mpo", "--hf-file", str(internvl["weights"]), "--cases", str(mpo_reference["cases"]),
                            "--out", str(tmp_path), *([flag, str(size)] if flag else [])])
    result = json.loads((tmp_path / "result.json").read_text())
    assert_mpo_result_matches(result, mpo_reference)
    assert result["pairs"] == 5
    # Some row of rank 0 holds two pairs with images (2 x 3 tiles is the most one pair brings).
    assert max(result["tiles_per_row"]) > 2 * 3, result["tiles_per_row"]
    assert_every_vision_param_trains(mpo_reference["grads"])
    assert_grads_match(load_file(str(tmp_path / "grads.safetensors")), mpo_reference["grads"], f"mpo {layout}")
    assert (result["dummy_entries"], result["dummy_grad_max_abs"]) == (DUMMY_ENTRIES_TP2 if layout == "tp2" else 0, 0.0)
