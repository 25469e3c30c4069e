"""Hugging Face ``config.json`` <-> architecture records (:mod:`.presets`).

The config half of the HF adapter of this model folder; :mod:`.hf_mapping` is the tensor
half and the only place that knows HF tensor names. Readers: a Qwen2 ``config.json`` and
both InternVL layouts (transformers' ``InternVLConfig``, the released InternVL-chat /
Skywork ``config.json``); writers produce the keyword arguments or ``config.json`` dicts
those releases carry.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_r1v.models.r1v.presets import DecoderArch, R1VArch, VisionArch


def decoder_arch_from_hf_config(cfg: dict[str, Any]) -> DecoderArch:
    """A :class:`DecoderArch` from a Qwen2 ``config.json`` (dict)."""
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        arch = DecoderArch(
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_query_groups=int(cfg.get("num_key_value_heads") or heads),
            ffn_hidden_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            untie_embeddings=not bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise ValueError(f"Qwen2 config is missing key {err.args[0]!r}") from None
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise ValueError(f"Qwen2 config head_dim={head_dim} differs from hidden_size/num_attention_heads")
    return arch


def decoder_arch_to_hf_config(arch: DecoderArch) -> dict[str, Any]:
    """Keyword arguments of ``transformers.Qwen2Config`` for ``arch``."""
    return {
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "intermediate_size": arch.ffn_hidden_size,
        "vocab_size": arch.vocab_size,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.rms_norm_eps,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": not arch.untie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_sliding_window": False,
    }


def _vision_config_common(v: VisionArch) -> dict[str, Any]:
    """InternViT config keys both HF layouts spell the same way."""
    return {
        "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_attention_heads,
        "intermediate_size": v.ffn_hidden_size,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.norm_eps,
        "norm_type": "rms_norm",
        "hidden_act": "gelu",
    }


def transformers_internvl_config(arch: R1VArch) -> dict[str, Any]:
    """Keyword arguments of ``transformers.InternVLConfig`` for ``arch`` (transformers layout).

    transformers' pixel shuffle is InternVL's v2 order; a v1 model orders its visual
    tokens as a spatial transpose of that, which no weight permutation can express in
    this layout, so it is refused rather than mis-exported. An architecture without an
    image token id (a 38B preset before a tokenizer gave it one) is refused too: the config
    would otherwise carry transformers' default id.
    """
    if arch.vision is None or arch.adapter is None:
        raise ValueError("a decoder-only architecture has no InternVL config")
    if arch.image_token_id is None:
        raise ValueError("the transformers InternVL config records the image token id, and this architecture has "
                         "none: take it from the tokenizer (trainer/arch.py) or the checkpoint")
    if arch.adapter.ps_version != "v2":
        raise ValueError("the transformers InternVL layout only expresses ps_version v2; use the skywork layout")
    return {
        "vision_config": {
            **_vision_config_common(arch.vision),
            "use_qk_norm": True,
            "attention_bias": False,
            "use_mean_pooling": True,  # no final norm
            "use_absolute_position_embeddings": True,
        },
        "text_config": {"model_type": "qwen2", **decoder_arch_to_hf_config(arch.decoder)},
        "image_token_id": arch.image_token_id,
        "image_seq_length": arch.tokens_per_tile,
        "downsample_ratio": arch.adapter.downsample_ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",  # drop the class token
        # InternVLConfig defaults to tied; R1V2 is untied and save_pretrained would drop lm_head.
        "tie_word_embeddings": not arch.decoder.untie_embeddings,
    }


def arch_from_transformers_config(cfg: dict[str, Any]) -> R1VArch:
    """An :class:`R1VArch` from an ``InternVLForConditionalGeneration`` config.json (dict),
    or a decoder-only one from a Qwen2 config.json."""
    from megatron_r1v.models.r1v.presets import AdapterArch

    if cfg.get("model_type") == "qwen2":
        return R1VArch(decoder_arch_from_hf_config(cfg), "from a Qwen2 config.json")
    try:
        vision_cfg, text_cfg = cfg["vision_config"], cfg["text_config"]
        image = vision_cfg.get("image_size", 448)
        patch = vision_cfg.get("patch_size", 14)
        vision = VisionArch(
            hidden_size=int(vision_cfg["hidden_size"]),
            num_layers=int(vision_cfg["num_hidden_layers"]),
            num_attention_heads=int(vision_cfg["num_attention_heads"]),
            ffn_hidden_size=int(vision_cfg["intermediate_size"]),
            image_size=int(image[0] if isinstance(image, (list, tuple)) else image),
            patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
            num_channels=int(vision_cfg.get("num_channels", 3)),
            norm_eps=float(vision_cfg.get("layer_norm_eps", 1e-6)),
        )
        image_token_id = int(cfg["image_token_id"])
    except KeyError as err:
        raise ValueError(f"InternVL config is missing key {err.args[0]!r}") from None
    unsupported = {
        "norm_type": (vision_cfg.get("norm_type"), "rms_norm"),
        "use_qk_norm": (vision_cfg.get("use_qk_norm"), True),
        "use_mean_pooling": (vision_cfg.get("use_mean_pooling", True), True),
        "vision_feature_layer": (cfg.get("vision_feature_layer", -1), -1),
        "vision_feature_select_strategy": (cfg.get("vision_feature_select_strategy", "default"), "default"),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"InternVL config {key}={got!r} is not an R1V2 architecture (expected {want!r})")
    decoder = decoder_arch_from_hf_config({**text_cfg, "tie_word_embeddings": cfg.get("tie_word_embeddings", False)})
    adapter = AdapterArch(downsample_ratio=float(cfg.get("downsample_ratio", 0.5)), ps_version="v2")
    return R1VArch(decoder, "from a transformers InternVL config.json", vision=vision, adapter=adapter,
                   image_token_id=image_token_id)


SKYWORK_DEFAULTS = {
    "template": "internvl2_5",
    "use_thumbnail": True,
    "dynamic_image_size": True,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
}
"""InternVL-chat config keys megatron-r1v does not model; taken from the source checkpoint
when it had them (kept in ``hf_extra/config.json``), else these values."""


def arch_from_skywork_config(cfg: dict[str, Any], image_token_id: int) -> R1VArch:
    """An :class:`R1VArch` from an InternVL-chat / Skywork-R1V2 config.json (dict).

    The IMG_CONTEXT id is not part of that config (the remote code reads it from the
    tokenizer), so the caller supplies it.
    """
    from megatron_r1v.models.r1v.presets import AdapterArch

    try:
        v, llm = cfg["vision_config"], cfg["llm_config"]
        vision = VisionArch(
            hidden_size=int(v["hidden_size"]),
            num_layers=int(v["num_hidden_layers"]),
            num_attention_heads=int(v["num_attention_heads"]),
            ffn_hidden_size=int(v["intermediate_size"]),
            image_size=int(cfg.get("force_image_size") or v["image_size"]),
            patch_size=int(v["patch_size"]),
            num_channels=int(v.get("num_channels", 3)),
            norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        )
    except KeyError as err:
        raise ValueError(f"InternVL-chat config is missing key {err.args[0]!r}") from None
    checks = {
        "vision_config.qk_normalization": (v.get("qk_normalization"), True),
        "vision_config.qkv_bias": (v.get("qkv_bias", False), False),
        "vision_config.norm_type": (v.get("norm_type"), "rms_norm"),
        "select_layer": (cfg.get("select_layer", -1), -1),
    }
    for key, (got, want) in checks.items():
        if got != want:
            raise ValueError(f"InternVL-chat config {key}={got!r} is not an R1V2 architecture (expected {want!r})")
    adapter = AdapterArch(downsample_ratio=float(cfg.get("downsample_ratio", 0.5)), ps_version=cfg.get("ps_version", "v1"))
    decoder = decoder_arch_from_hf_config(llm)
    return R1VArch(decoder, "from an InternVL-chat config.json", vision=vision, adapter=adapter,
                   image_token_id=image_token_id)


def skywork_config(arch: R1VArch, extras: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """config.json of the released (InternVL-chat) layout for ``arch``."""
    if arch.vision is None or arch.adapter is None:
        raise ValueError("a decoder-only architecture has no InternVL-chat config")
    v = arch.vision
    llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **decoder_arch_to_hf_config(arch.decoder)}
    kept = {k: (extras or {}).get(k, default) for k, default in SKYWORK_DEFAULTS.items()}
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            **_vision_config_common(v),
            "qk_normalization": True,
            "qkv_bias": False,
        },
        "llm_config": llm,
        "downsample_ratio": arch.adapter.downsample_ratio,
        "ps_version": arch.adapter.ps_version,
        "select_layer": -1,
        "force_image_size": v.image_size,
        "img_context_token_id": arch.image_token_id,
        **kept,
    }
