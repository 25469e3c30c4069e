"""Tiny R1V parts in their public formats, for the assembly tests (unit and distributed).

- :func:`write_internvit`: a standalone InternViT release as OpenGVLab publishes one
  (``InternVisionModel``: its config.json keys and tensor names are written out here by
  hand, not through ``hf_mapping``, so the tests hold the mapping to the public names);
- :func:`write_qwen2`: a ``Qwen2ForCausalLM`` folder written by transformers'
  ``save_pretrained`` (sharded, with an index) plus a byte-level BPE tokenizer from
  ``data/tokenizer.py`` without InternVL's image tokens, as Qwen2's own tokenizers are.

Sizes are the ``tiny-r1v`` preset's (a 2-layer ViT of 3 heads on 56px tiles, a 4-layer
GQA decoder), so the assembled model goes through import and verify at TP=2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_r1v.models.r1v.presets import DecoderArch, VisionArch, get_preset

ARCH = get_preset("tiny-r1v")
VISION: VisionArch = ARCH.vision
DECODER: DecoderArch = ARCH.decoder
TRAINED_VOCAB = 640
"""data/tokenizer.py's BPE is trained with 640 tokens, <IMG_CONTEXT> last (639)."""
QWEN_TOKENS = TRAINED_VOCAB - 3
"""Tokens of the Qwen2-like tokenizer: the trained one without <img>, </img>, <IMG_CONTEXT>."""
CORPUS = ["The answer is 42. Think step by step about the triangle and its area.",
          "A circle of radius 3 has area 9 pi; the square of side 4 has area 16."]


def internvit_tensors(vision: VisionArch, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under InternVisionModel's names (norms near 1, layer scales near 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    h, f, p = vision.hidden_size, vision.ffn_hidden_size, vision.patch_size

    def rand(*shape, scale=0.05, offset=0.0):
        return torch.randn(shape, generator=gen) * scale + offset

    tensors = {
        "embeddings.class_embedding": rand(1, 1, h, scale=0.5),
        "embeddings.patch_embedding.weight": rand(h, vision.num_channels, p, p, scale=0.02),
        "embeddings.patch_embedding.bias": rand(h),
        "embeddings.position_embedding": rand(1, vision.num_positions, h, scale=0.5),
    }
    for i in range(vision.num_layers):
        layer = f"encoder.layers.{i}."
        tensors.update({
            layer + "attn.qkv.weight": rand(3 * h, h, scale=0.2),
            layer + "attn.q_norm.weight": rand(h, scale=0.1, offset=1.0),
            layer + "attn.k_norm.weight": rand(h, scale=0.1, offset=1.0),
            layer + "attn.proj.weight": rand(h, h, scale=0.2),
            layer + "attn.proj.bias": rand(h),
            layer + "mlp.fc1.weight": rand(f, h, scale=0.2),
            layer + "mlp.fc1.bias": rand(f),
            layer + "mlp.fc2.weight": rand(h, f, scale=0.2),
            layer + "mlp.fc2.bias": rand(h),
            layer + "norm1.weight": rand(h, scale=0.1, offset=1.0),
            layer + "norm2.weight": rand(h, scale=0.1, offset=1.0),
            layer + "ls1": rand(h, scale=0.02, offset=0.1),
            layer + "ls2": rand(h, scale=0.02, offset=0.1),
        })
    return tensors


def internvit_config(vision: VisionArch) -> dict:
    """config.json of the standalone release (InternViT-6B-448px-V2_5's keys)."""
    return {
        "architectures": ["InternVisionModel"],
        "auto_map": {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                     "AutoModel": "modeling_intern_vit.InternVisionModel"},
        "attention_dropout": 0.0, "drop_path_rate": 0.0, "dropout": 0.0, "hidden_act": "gelu",
        "hidden_size": vision.hidden_size, "image_size": vision.image_size, "initializer_factor": 0.1,
        "initializer_range": 1e-10, "intermediate_size": vision.ffn_hidden_size, "layer_norm_eps": 1e-6,
        "model_type": "intern_vit_6b", "norm_type": "rms_norm", "num_attention_heads": vision.num_attention_heads,
        "num_channels": vision.num_channels, "num_hidden_layers": vision.num_layers, "patch_size": vision.patch_size,
        "qk_normalization": True, "qkv_bias": False, "torch_dtype": "float32", "transformers_version": "4.37.2",
        "use_flash_attn": True,
    }


def write_internvit(directory: Path, vision: VisionArch = VISION, seed: int = 1) -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True)
    tensors = internvit_tensors(vision, seed)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(internvit_config(vision), indent=2))
    return tensors


def qwen_like_tokenizer(with_image_tokens: bool = False, family: str = "qwq"):
    """data/tokenizer.py's BPE (the family's chat and think tokens at the top ids); by default
    without InternVL's three image tokens (the last three ids), leaving 637 contiguous ids."""
    from megatron_r1v.data.tokenizer import train_tokenizer, without_image_tokens

    tokenizer = train_tokenizer(CORPUS, TRAINED_VOCAB, family)
    if with_image_tokens:
        return tokenizer
    stripped = without_image_tokens(tokenizer)
    assert stripped.get_vocab_size() == QWEN_TOKENS
    return stripped


def write_qwen2(directory: Path, rows: int, seed: int = 2, decoder: DecoderArch = DECODER,
                with_image_tokens: bool = False, max_shard_size: str = "150KB", family: str = "qwq") -> None:
    """A Qwen2ForCausalLM with ``rows`` vocabulary rows (Qwen2 checkpoints pad past the
    tokenizer), norms and biases moved off their init so swapped tensors cannot pass; its
    tokenizer has the special tokens and ``chat_template`` of ``family``
    (``data.tokenizer.FAMILY_TOKENS``: qwq for QwQ-32B, r1-distill for R1-Distill-Qwen-32B)."""
    import transformers

    from megatron_r1v.data.tokenizer import save_hf_tokenizer
    from megatron_r1v.models.r1v.hf_config import decoder_arch_to_hf_config

    config = transformers.Qwen2Config(**decoder_arch_to_hf_config(dataclasses.replace(decoder, vocab_size=rows)))
    config.architectures = ["Qwen2ForCausalLM"]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(config).float()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name or "bias" in name:
                    param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    save_hf_tokenizer(qwen_like_tokenizer(with_image_tokens, family), directory, family=family)
