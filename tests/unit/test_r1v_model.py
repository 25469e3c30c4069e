"""R1V model pieces that need no process group: presets, pixel shuffle, FP8 settings."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_r1v.config import FP8Config, load_config
from megatron_r1v.models.r1v.adapter import pixel_shuffle
from megatron_r1v.models.r1v.hf_config import transformers_internvl_config
from megatron_r1v.models.r1v.presets import AdapterArch, R1VArch, get_preset
from megatron_r1v.models.r1v.spec import fp8_transformer_kwargs
from megatron_r1v.models.r1v.vision import padded_heads

REPO = Path(__file__).resolve().parents[2]


def test_r1v2_38b_preset_has_the_released_numbers():
    arch = get_preset("r1v2-38b")
    v, d = arch.vision, arch.decoder
    assert (v.hidden_size, v.num_layers, v.num_attention_heads, v.ffn_hidden_size) == (3200, 45, 25, 12800)
    assert (v.image_size, v.patch_size, v.num_positions, v.norm_eps) == (448, 14, 1025, 1e-6)
    assert (arch.adapter_input_size, d.hidden_size, arch.tokens_per_tile) == (12800, 5120, 256)
    assert arch.decoder == get_preset("qwq-32b").decoder
    counts = arch.parameter_counts()
    assert round(counts["total"] / 1e9, 2) == 38.39
    assert round(counts["vision"] / 1e9, 3) == 5.536
    assert round(counts["adapter"] / 1e6, 1) == 91.8
    assert round(counts["decoder"] / 1e9, 2) == 32.76


def test_closed_form_counts_match_transformers_internvl_on_meta():
    import transformers

    arch = dataclasses.replace(get_preset("r1v2-38b"), image_token_id=0)  # a tokenizer's id; it changes no count
    config = transformers.InternVLConfig(**transformers_internvl_config(arch))
    with torch.device("meta"):
        model = transformers.InternVLForConditionalGeneration(config)
    by_part = {"vision": 0, "adapter": 0, "decoder": 0}
    for name, p in model.named_parameters():
        part = "vision" if ".vision_tower." in name else "adapter" if "multi_modal_projector" in name else "decoder"
        by_part[part] += p.numel()
    counts = arch.parameter_counts()
    assert by_part == {k: counts[k] for k in by_part}


def test_megatron_model_on_meta_device_reports_38_39b():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "count_params.py"), "--preset", "r1v2-38b"],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["total_b"] == 38.39 and result["matches_closed_form"]
    assert (result["vision"], result["adapter"]) == (5_536_496_000, 91_786_240)


def _reference_shuffle_v2(x):
    # Written from InternVL's definition: output token (a, b) concatenates the 2x2 block
    # x[2a, 2b], x[2a, 2b+1], x[2a+1, 2b], x[2a+1, 2b+1] (v1 transposes the token grid).
    n, w, h, c = x.shape
    out = torch.empty(n, w // 2, h // 2, 4 * c)
    for a in range(w // 2):
        for b in range(h // 2):
            out[:, a, b] = torch.cat([x[:, 2 * a, 2 * b], x[:, 2 * a, 2 * b + 1],
                                      x[:, 2 * a + 1, 2 * b], x[:, 2 * a + 1, 2 * b + 1]], dim=-1)
    return out


@pytest.mark.parametrize("side", [4, 6])
def test_pixel_shuffle_orders(side):
    import transformers

    x = torch.randn(2, side, side, 3)
    v2 = pixel_shuffle(x, 0.5, "v2")
    assert torch.equal(v2, _reference_shuffle_v2(x))
    assert torch.equal(pixel_shuffle(x, 0.5, "v1"), v2.transpose(1, 2))
    # transformers' InternVL implements v2.
    hf = transformers.InternVLModel.pixel_shuffle(None, x, scale_factor=0.5)
    assert torch.equal(v2, hf)
    with pytest.raises(ValueError, match="ps_version must be v1 or v2"):
        pixel_shuffle(x, 0.5, "v3")
    with pytest.raises(ValueError, match="does not divide the 5x5 token grid"):
        pixel_shuffle(torch.randn(1, 5, 5, 2), 0.5, "v2")


def test_dummy_head_padding():
    assert [padded_heads(25, tp) for tp in (1, 2, 4, 8)] == [25, 26, 28, 32]


def test_v1_checkpoints_cannot_use_the_transformers_layout():
    with pytest.raises(ValueError, match="only expresses ps_version v2"):
        transformers_internvl_config(get_preset("tiny-r1v-ps-v1"))


def test_arch_consistency_checks():
    dec = get_preset("tiny-qwen2").decoder
    with pytest.raises(ValueError, match="vision, adapter and image_token_id go together"):
        R1VArch(dec, vision=get_preset("tiny-r1v").vision)
    with pytest.raises(ValueError, match="must be 1/integer"):
        _ = AdapterArch(downsample_ratio=0.3).shuffle_factor


def test_fp8_settings():
    assert fp8_transformer_kwargs(FP8Config(), "local") == {}  # FP8 off
    cfg = FP8Config(format="hybrid", recipe="current", amax_history_len=16, margin=1)
    assert fp8_transformer_kwargs(cfg, "te") == {
        "fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_margin": 1, "fp8_amax_history_len": 16,
        "fp8_amax_compute_algo": "max",
    }
    assert fp8_transformer_kwargs(FP8Config(format="e4m3"), "te")["fp8_recipe"] == "delayed"
    with pytest.raises(ValueError, match="needs Transformer Engine layers, but the backend is 'local'"):
        fp8_transformer_kwargs(cfg, "local")
    with pytest.raises(ValueError, match="amax_history_len must be >= 1"):
        fp8_transformer_kwargs(FP8Config(format="hybrid", amax_history_len=0), "te")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        fp8_transformer_kwargs(FP8Config(format="hybrid", margin=-1), "te")
    # The YAML path rejects unknown formats before any of this runs.
    with pytest.raises(ValueError, match=r"'model\.fp8\.format': 'e5m2' is not one of"):
        load_config(None, ["model.fp8.format=e5m2"])
    assert load_config(None, ["model.fp8.format=hybrid", "model.fp8.recipe=current"]).model.fp8.recipe == "current"
