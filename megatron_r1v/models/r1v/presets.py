"""Architecture presets: the released R1V / R1V2 / R1V3 38B models, their decoders, and tiny test models.

An architecture is pure data (no torch); :mod:`megatron_r1v.models.r1v.model` turns it
into Megatron-Core configs and modules. Tiny presets keep every structural feature of
the real ones (GQA, QKV bias, untied output, a vocabulary that is not a multiple of
TP) so CPU tests exercise the same code paths.

A preset is needed only to initialise a model randomly: a run with ``model.checkpoint``
builds the architecture the checkpoint records, and a preset given with it must agree
(:func:`architecture_differences`, ``trainer/arch.py``). Token ids are never a preset's:
the 38B presets leave ``image_token_id`` unset, and the tiny ones keep the top id (where
``data/tokenizer.py``'s BPE puts ``<IMG_CONTEXT>``) for tests that build a model without a
tokenizer; a run takes the id from its tokenizer (or checkpoint) instead.
Every number of a released model below names the public ``config.json`` it comes from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class DecoderArch:
    """A Qwen2-family decoder (QwQ-32B is one)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    """Number of key/value heads (GQA groups)."""
    ffn_hidden_size: int
    vocab_size: int
    """True vocabulary size (before any TP padding)."""
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    untie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int, divisible_by: int = 128, reshard_tp: int = 8) -> int:
        """The vocabulary padded to a multiple of ``divisible_by * lcm(tp, reshard_tp)``.

        Megatron pads to ``divisible_by * tp``, which changes the embedding's shape with
        TP and stops checkpoints from loading at another TP. Padding for ``reshard_tp``
        too keeps the shape equal for every TP that divides it (152064 -> 152576 for
        QwQ at TP 1, 2, 4 and 8); ``reshard_tp=1`` gives Megatron's padding.
        """
        multiple = divisible_by * math.lcm(tp, reshard_tp)
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tp: int, pp: int, where: str = "decoder") -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{where}: hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"{where}: num_attention_heads={self.num_attention_heads} not divisible by "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.num_attention_heads % tp or self.num_query_groups % tp:
            raise ValueError(
                f"parallel.tp={tp} must divide the decoder's num_attention_heads={self.num_attention_heads} "
                f"and num_query_groups={self.num_query_groups} ({where})"
            )
        if self.ffn_hidden_size % tp:
            raise ValueError(f"parallel.tp={tp} must divide the decoder's ffn_hidden_size={self.ffn_hidden_size} ({where})")
        if self.num_layers % pp:
            raise ValueError(f"parallel.pp={pp} must divide the decoder's num_layers={self.num_layers} ({where})")

    def num_parameters(self) -> int:
        """Exact parameter count of the unpadded decoder (embeddings + layers + head)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        kv = self.num_query_groups * self.head_dim
        attn = h * h + 2 * h * kv + (h + 2 * kv) + h * h  # q, k, v weights; qkv bias; o_proj
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h  # two RMSNorms
        head = v * h if self.untie_embeddings else 0
        return v * h + self.num_layers * per_layer + h + head


@dataclass(frozen=True)
class VisionArch:
    """An InternViT encoder (InternViT-6B-448px for R1V2)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_eps: float = 1e-6
    """RMSNorm eps of the layer norms and of the all-heads q/k norms."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patches plus the class token (1025 at 448px / patch 14)."""
        return self.patches_per_side**2 + 1

    def check(self, where: str = "vision") -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{where}: hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"{where}: image_size {self.image_size} not divisible by patch_size {self.patch_size}")

    def num_parameters(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        # qkv (no bias) + proj (bias) + q/k norms + fc1/fc2 (bias) + two norms + ls1/ls2
        per_layer = 3 * h * h + (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h + 2 * h
        embeddings = self.num_channels * self.patch_size**2 * h + h + h + self.num_positions * h
        return embeddings + self.num_layers * per_layer


@dataclass(frozen=True)
class AdapterArch:
    """The mlp1 adapter: pixel shuffle -> LayerNorm -> Linear -> GELU -> Linear."""

    downsample_ratio: float = 0.5
    ps_version: Literal["v1", "v2"] = "v2"
    """Token order of the pixel shuffle: v2 adds InternVL's final transpose (v1 omits it)."""
    norm_eps: float = 1e-5

    @property
    def shuffle_factor(self) -> int:
        """Channel multiplier of the pixel shuffle: 1 / ratio^2 (4 at ratio 0.5)."""
        inv = round(1 / self.downsample_ratio)
        if abs(inv * self.downsample_ratio - 1) > 1e-9:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} must be 1/integer")
        return inv * inv


@dataclass(frozen=True)
class R1VArch:
    """A whole model: decoder, and optionally an InternViT encoder with its adapter (Eq. 1)."""

    decoder: DecoderArch
    description: str = ""
    vision: Optional[VisionArch] = None
    adapter: Optional[AdapterArch] = None
    image_token_id: Optional[int] = None
    """Id of the IMG_CONTEXT token whose embeddings the adapter output replaces: read from the
    tokenizer or the checkpoint when a run starts (``trainer/arch.py``); None until then."""

    def __post_init__(self) -> None:
        if (self.vision is None) != (self.adapter is None) or (self.vision is None and self.image_token_id is not None):
            raise ValueError("vision, adapter and image_token_id go together (image_token_id may stay None "
                             "until a tokenizer gives it)")

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens per tile after the pixel shuffle (256 for 448px tiles)."""
        assert self.vision is not None and self.adapter is not None
        return self.vision.patches_per_side**2 // self.adapter.shuffle_factor

    @property
    def adapter_input_size(self) -> int:
        assert self.vision is not None and self.adapter is not None
        return self.vision.hidden_size * self.adapter.shuffle_factor

    def check_parallel(self, tp: int, pp: int, where: str = "model") -> None:
        self.decoder.check_parallel(tp, pp, where)
        if self.vision is not None:
            self.vision.check(where)
            if self.decoder.hidden_size % tp:
                raise ValueError(f"parallel.tp={tp} must divide the adapter width {self.decoder.hidden_size} ({where})")

    def parameter_counts(self) -> dict[str, int]:
        """Exact parameter counts by part (closed form; the meta-device count must agree)."""
        counts = {"decoder": self.decoder.num_parameters()}
        if self.vision is not None:
            n_in, n_out = self.adapter_input_size, self.decoder.hidden_size
            counts["vision"] = self.vision.num_parameters()
            counts["adapter"] = 2 * n_in + (n_in * n_out + n_out) + (n_out * n_out + n_out)
        counts["total"] = sum(counts.values())
        return counts


# --- Released models ---------------------------------------------------------------------
# Read from the public config.json files (huggingface.co/<repo>/blob/main/config.json, or a
# copy of one that names its source in _name_or_path); "not confirmed" marks a number that
# could not be read from the model's own config and is inferred as the comment says. A
# checkpoint always wins: importing a release records the architecture its config.json
# gives, and a preset that disagrees with it is an error naming the differing fields.

# Qwen/QwQ-32B (the R1V2-38B language model). 64 layers, 40 query / 8 key-value heads,
# RoPE, SwiGLU, RMSNorm, QKV bias: the QwQ-32B model card. hidden 5120, ffn 27648, vocab
# 152064, rms_norm_eps 1e-5, rope_theta 1e6, untied: QwQ-32B-Preview's config.json, the
# same numbers as Qwen/Qwen2.5-32B's (QwQ is built on it). Not confirmed:
# max_position_embeddings 40960 (QwQ-32B's own config.json could not be read here; the
# Preview says 32768, Qwen2.5-32B 131072). The parameter count, 32,763,876,352, equals the
# safetensors total the Hub reports for DeepSeek-R1-Distill-Qwen-32B (same shapes).
QWQ_32B = DecoderArch(
    hidden_size=5120,
    num_layers=64,
    num_attention_heads=40,
    num_query_groups=8,
    ffn_hidden_size=27648,
    vocab_size=152064,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=40960,
)

# deepseek-ai/DeepSeek-R1-Distill-Qwen-32B (the R1V-38B language model): hidden 5120, 64
# layers, 40 / 8 heads, ffn 27648, vocab 152064, rms_norm_eps 1e-5, rope_theta 1e6,
# max_position_embeddings 131072, tie_word_embeddings false (its config.json).
DEEPSEEK_R1_DISTILL_QWEN_32B = dataclasses.replace(QWQ_32B, max_position_embeddings=131072)

# The Qwen2.5-32B language model of OpenGVLab/InternVL3-38B (R1V3-38B's starting point).
# Shapes (hidden 5120, 64 layers, 40 / 8 heads, ffn 27648, untied, rope_theta 1e6): Qwen/
# Qwen2.5-32B's config.json. Not confirmed for the 38B: vocab_size 151674 (InternVL's
# tokenizer: Qwen2.5's plus <img>, </img>, <IMG_CONTEXT>, ...), max_position_embeddings
# 32768 and rms_norm_eps 1e-6 are what the llm_config of the other InternVL3 sizes (1B, 8B,
# 78B) holds; InternVL3-38B's own config.json could not be read here. Those configs also
# set rope_scaling {type: dynamic, factor: 2.0}, which changes nothing within 32768
# positions and is not modelled (nor read by hf_config.py).
INTERNVL3_38B_LLM = dataclasses.replace(QWQ_32B, vocab_size=151674, rms_norm_eps=1e-6, max_position_embeddings=32768)

# 4 query heads in 2 groups (TP=2 splits groups); vocab 251 is divisible by neither 128 nor any TP.
TINY_QWEN2 = DecoderArch(
    hidden_size=64,
    num_layers=4,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=96,
    vocab_size=251,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
)

# OpenGVLab/InternViT-6B-448px-V2_5, the encoder of all three 38B models (the Skywork model
# cards; InternVL3's model table). InternViT-6B: width 3200, 25 heads, MLP 12800 (ratio 4),
# RMSNorm (eps 1e-6) with q/k RMSNorm, layer scale, 448px tiles of 14px patches (InternVL's
# intern_vit_6b). Not confirmed from the V2_5 config.json itself (not read here): 45 layers
# (InternViT-6B has 48 blocks; the V1-5 and later releases drop the last 3) and qkv_bias
# false (hf_config.arch_from_skywork_config refuses a vision_config with qkv_bias, without
# qk_normalization or not rms_norm, so an import would say so). The adapter count this
# gives, 91,786,240 (3200 x 4 -> 5120 -> 5120), is the "MLP 91.78M" of InternVL-Chat-V1-1's
# model card (InternViT-6B + the 5120-wide LLaMA2-13B).
INTERNVIT_6B_448PX = VisionArch(hidden_size=3200, num_layers=45, num_attention_heads=25, ffn_hidden_size=12800)

# mlp1 of the InternVL-chat releases: downsample_ratio 0.5 (Skywork-R1V-38B's config.json;
# InternVL3's), select_layer -1, ps_version v2 (InternVL3's configs; not confirmed for the
# Skywork configs, whose ps_version could not be read here; transformers' InternVL and the
# HF rollout engine only have v2).
INTERNVL_MLP1 = AdapterArch(downsample_ratio=0.5, ps_version="v2")

# 3 heads: no TP > 1 divides them, so dummy heads are always exercised. 56px tiles of
# 14px patches give 16 patches -> 4 visual tokens per tile after the pixel shuffle.
TINY_VIT = VisionArch(hidden_size=24, num_layers=2, num_attention_heads=3, ffn_hidden_size=40, image_size=56)

_PRESETS: dict[str, R1VArch] = {
    # Skywork/Skywork-R1V-38B: InternViT-6B-448px-V2_5 + mlp1 + DeepSeek-R1-Distill-Qwen-32B.
    # Its config.json (SkyworkR1VChatModel) confirms downsample_ratio 0.5, force_image_size
    # 448 and llm_config hidden 5120, intermediate 27648, max_position_embeddings 131072; the
    # rest of its llm_config and vision_config could not be read here (taken from the parts).
    "r1v-38b": R1VArch(
        DEEPSEEK_R1_DISTILL_QWEN_32B, "Skywork-R1V-38B: InternViT-6B-448px-V2_5 + mlp1 + DeepSeek-R1-Distill-Qwen-32B",
        vision=INTERNVIT_6B_448PX, adapter=INTERNVL_MLP1,
    ),
    # Skywork/Skywork-R1V2-38B: InternViT-6B-448px-V2_5 + mlp1 + QwQ-32B (model card). Its
    # config.json could not be read here: the numbers are the parts'. <IMG_CONTEXT> is read
    # from its tokenizer (151667, the id InternVL's Qwen2.5 tokenizers give it, is <think> in
    # QwQ's vocabulary).
    "r1v2-38b": R1VArch(
        QWQ_32B, "Skywork-R1V2-38B: InternViT-6B-448px-V2_5 + mlp1 + QwQ-32B",
        vision=INTERNVIT_6B_448PX, adapter=INTERNVL_MLP1,
    ),
    # Skywork/Skywork-R1V3-38B: post-trained from OpenGVLab/InternVL3-38B (InternViT-6B-448px-
    # V2_5 + mlp1 + Qwen2.5-32B), whose architecture it keeps (model cards). Neither config.json
    # could be read here: see INTERNVL3_38B_LLM for the numbers not confirmed.
    "r1v3-38b": R1VArch(
        INTERNVL3_38B_LLM, "Skywork-R1V3-38B (InternVL3-38B's architecture): InternViT-6B-448px-V2_5 + mlp1 + "
        "Qwen2.5-32B", vision=INTERNVIT_6B_448PX, adapter=INTERNVL_MLP1,
    ),
    "qwq-32b": R1VArch(QWQ_32B, "QwQ-32B decoder (the R1V2-38B language model)"),
    "tiny-r1v": R1VArch(
        TINY_QWEN2, "2-layer ViT + adapter + 4-layer Qwen2 for CPU tests",
        vision=TINY_VIT, adapter=AdapterArch(), image_token_id=250,
    ),
    "tiny-r1v-ps-v1": R1VArch(
        TINY_QWEN2, "tiny-r1v with the v1 pixel-shuffle order",
        vision=TINY_VIT, adapter=AdapterArch(ps_version="v1"), image_token_id=250,
    ),
    "tiny-qwen2": R1VArch(TINY_QWEN2, "4-layer Qwen2 decoder for CPU tests"),
    # For end-to-end runs with the byte-level BPE of data/tokenizer.py built with
    # --vocab-size 640: its special tokens take the top ids, <IMG_CONTEXT> = 639.
    "tiny-r1v-chat": R1VArch(
        dataclasses.replace(TINY_QWEN2, vocab_size=640, max_position_embeddings=2048),
        "tiny-r1v with a 640-token vocabulary matching data/tokenizer.py's BPE",
        vision=TINY_VIT, adapter=AdapterArch(), image_token_id=639,
    ),
}


def architecture_differences(a: R1VArch, b: R1VArch) -> list[str]:
    """Every decoder, vision and adapter field in which ``a`` and ``b`` differ, as
    ``"decoder.vocab_size: 152064 != 151674"`` (``a``'s value first). Descriptions and token
    ids are not architecture and are not compared."""
    out = []
    for part in ("decoder", "vision", "adapter"):
        x, y = getattr(a, part), getattr(b, part)
        if x is None or y is None:
            if (x is None) != (y is None):
                out.append(f"{part}: {'none' if x is None else 'present'} != {'none' if y is None else 'present'}")
            continue
        out += [f"{part}.{f.name}: {getattr(x, f.name)!r} != {getattr(y, f.name)!r}"
                for f in dataclasses.fields(x) if getattr(x, f.name) != getattr(y, f.name)]
    return out


def get_preset(name: str) -> R1VArch:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(_PRESETS))}")
    return _PRESETS[name]


def preset_names() -> list[str]:
    return sorted(_PRESETS)

