"""The released-model presets against the numbers of their public config.json files (the
comments in models/r1v/presets.py name each source and what could not be confirmed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1v.models.r1v.presets import get_preset

REPO = Path(__file__).resolve().parents[2]

# (hidden, layers, heads, kv groups, ffn, vocab, rope_theta, rms eps, max positions, untied)
QWEN25_32B_SHAPES = (5120, 64, 40, 8, 27648)
DECODERS = {
    "r1v-38b": QWEN25_32B_SHAPES + (152064, 1e6, 1e-5, 131072, True),  # DeepSeek-R1-Distill-Qwen-32B
    "r1v2-38b": QWEN25_32B_SHAPES + (152064, 1e6, 1e-5, 40960, True),  # QwQ-32B
    "r1v3-38b": QWEN25_32B_SHAPES + (151674, 1e6, 1e-6, 32768, True),  # InternVL3-38B's Qwen2.5-32B
}


def decoder_numbers(d):
    return (d.hidden_size, d.num_layers, d.num_attention_heads, d.num_query_groups, d.ffn_hidden_size,
            d.vocab_size, d.rope_theta, d.rms_norm_eps, d.max_position_embeddings, d.untie_embeddings)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_38b_presets_have_the_released_numbers(name):
    arch = get_preset(name)
    assert decoder_numbers(arch.decoder) == DECODERS[name]
    v, a = arch.vision, arch.adapter  # InternViT-6B-448px-V2_5 + mlp1 in all three
    assert (v.hidden_size, v.num_layers, v.num_attention_heads, v.ffn_hidden_size) == (3200, 45, 25, 12800)
    assert (v.image_size, v.patch_size, v.num_channels, v.norm_eps) == (448, 14, 3, 1e-6)
    assert (a.downsample_ratio, a.ps_version, a.norm_eps, arch.tokens_per_tile) == (0.5, "v2", 1e-5, 256)
    assert arch.image_token_id is None  # read from the tokenizer / checkpoint, never a preset
    counts = arch.parameter_counts()
    assert (counts["vision"], counts["adapter"]) == (5_536_496_000, 91_786_240)  # InternVL cards: MLP 91.78M
    # DeepSeek-R1-Distill-Qwen-32B's safetensors hold 32,763,876,352 parameters (the Hub's count).
    vocab_rows = 2 * (152064 - arch.decoder.vocab_size) * 5120  # untied: embedding + output layer
    assert counts["decoder"] + vocab_rows == 32_763_876_352
    assert round(counts["total"] / 1e9, 2) == 38.39
    assert arch.decoder == get_preset("qwq-32b").decoder or name != "r1v2-38b"


def test_r1v3_38b_counts_on_the_meta_device():
    """The Megatron-Core model built on the meta device (nothing allocated) has the closed-form
    counts; r1v3-38b is the one whose vocabulary (151674) differs from r1v2-38b's (counted in
    test_r1v_model.py), and it pads to the same 152576 rows."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "count_params.py"), "--preset", "r1v3-38b"],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["matches_closed_form"] and result["total"] == 38_388_164_992
    assert result["vocab_padding"] == 2 * (152576 - 151674) * 5120
