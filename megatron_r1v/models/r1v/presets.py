"""Architecture presets: the released numbers of QwQ-32B / R1V2-38B and tiny test models.

An architecture is pure data (no torch); :mod:`megatron_r1v.models.r1v.model` turns it
into Megatron-Core configs and modules. Tiny presets keep every structural feature of
the real ones (GQA, QKV bias, untied output, a vocabulary that is not a multiple of
TP) so CPU tests exercise the same code paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """Megatron's padding: a multiple of ``divisible_by * tp``."""
        multiple = divisible_by * tp
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
class R1VArch:
    """A whole model: decoder, and (from the model issue on) vision tower and adapter."""

    decoder: DecoderArch
    description: str = ""
    extra: dict = field(default_factory=dict)

    def check_parallel(self, tp: int, pp: int, where: str = "model") -> None:
        self.decoder.check_parallel(tp, pp, where)


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

_PRESETS: dict[str, R1VArch] = {
    "qwq-32b": R1VArch(QWQ_32B, "QwQ-32B decoder (the R1V2-38B language model)"),
    "tiny-qwen2": R1VArch(TINY_QWEN2, "4-layer Qwen2 decoder for CPU tests"),
}


def get_preset(name: str) -> R1VArch:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(_PRESETS))}")
    return _PRESETS[name]


def preset_names() -> list[str]:
    return sorted(_PRESETS)

