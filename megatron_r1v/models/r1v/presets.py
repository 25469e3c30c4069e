"""Architecture presets: the released numbers of QwQ-32B / R1V2-38B and tiny test models.

An architecture is pure data (no torch); :mod:`megatron_r1v.models.r1v.model` turns it
into Megatron-Core configs and modules. Tiny presets keep every structural feature of
the real ones (GQA, QKV bias, untied output, a vocabulary that is not a multiple of
TP) so CPU tests exercise the same code paths.
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
    """Id of the IMG_CONTEXT token whose embeddings the adapter output replaces."""

    def __post_init__(self) -> None:
        if (self.vision is None) != (self.adapter is None) or (self.vision is None) != (self.image_token_id is None):
            raise ValueError("vision, adapter and image_token_id go together")

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

INTERNVIT_6B_448PX = VisionArch(hidden_size=3200, num_layers=45, num_attention_heads=25, ffn_hidden_size=12800)

# 3 heads: no TP > 1 divides them, so dummy heads are always exercised. 56px tiles of
# 14px patches give 16 patches -> 4 visual tokens per tile after the pixel shuffle.
TINY_VIT = VisionArch(hidden_size=24, num_layers=2, num_attention_heads=3, ffn_hidden_size=40, image_size=56)

_PRESETS: dict[str, R1VArch] = {
    "r1v2-38b": R1VArch(
        QWQ_32B,
        "Skywork-R1V2-38B: InternViT-6B-448px + mlp1 + QwQ-32B",
        vision=INTERNVIT_6B_448PX,
        adapter=AdapterArch(downsample_ratio=0.5, ps_version="v2"),
        # <IMG_CONTEXT> in the R1V2 / InternVL tokenizer; conversion re-reads it from the tokenizer.
        image_token_id=151667,
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


def get_preset(name: str) -> R1VArch:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(_PRESETS))}")
    return _PRESETS[name]


def preset_names() -> list[str]:
    return sorted(_PRESETS)

