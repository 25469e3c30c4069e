"""Layer specs: one function per block, parameterized by backend.

Two backends build the same math:

* ``te``: Transformer Engine modules (fused LayerNorm+Linear, FP8-capable) for GPUs;
* ``local``: Megatron-Core's own modules, which run anywhere (the CPU mode included).

Transformer Engine is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

Backend = Literal["local", "te"]


def te_installed() -> bool:
    """True when ``transformer_engine`` can be imported (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(requested: str, *, cuda_available: bool | None = None, te_present: bool | None = None) -> Backend:
    """Maps ``model.backend`` (auto/local/te) to the backend that will be built.

    ``auto`` picks TE only when both TE and CUDA are present; an explicit ``te`` without
    them is a configuration error rather than a silent fallback.
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    te = te_installed() if te_present is None else te_present
    if requested == "local":
        return "local"
    if requested == "te":
        if not te:
            raise ValueError(
                "model.backend=te but transformer_engine is not installed "
                "(pip install 'megatron-r1v[gpu]', or use model.backend=local)"
            )
        if not cuda:
            raise ValueError("model.backend=te needs CUDA; this machine has none (use model.backend=local)")
        return "te"
    if requested == "auto":
        return "te" if (te and cuda) else "local"
    raise ValueError(f"model.backend must be auto, local or te, got {requested!r}")


def decoder_layer_spec(backend: Backend) -> ModuleSpec:
    """Qwen2 decoder layer: RMSNorm, GQA attention with QKV bias, SwiGLU MLP.

    QKV bias and SwiGLU come from the TransformerConfig (``add_qkv_bias``,
    ``gated_linear_unit``); the spec chooses the module implementations. With TE the
    norms fuse into the following linear layers, which renames their weights
    (``linear_qkv.layer_norm_weight``); hf_mapping knows both namings.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if backend == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    if backend == "local":
        from megatron_r1v.models.r1v.attention import SegmentAttention

        layer_spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm")
        # Megatron's local DotProductAttention needs a dense [L, L] mask for packed rows.
        layer_spec.submodules.self_attention.submodules.core_attention = SegmentAttention
        return layer_spec
    raise ValueError(f"unknown backend {backend!r}")


def vision_layer_spec(backend: Backend, *, real_width: int, tp_group=None) -> ModuleSpec:
    """InternViT layer: RMSNorm -> MHA (no QKV bias, all-heads q/k RMSNorm) -> layer scale,
    RMSNorm -> MLP (exact GELU, biases) -> layer scale. Non-causal, no attention mask: the
    tiles are the batch dimension, so each tile attends only within itself.

    Norms stay separate modules with TE too (no fused LayerNorm-Linear), so parameter
    names are the same for both backends.
    """
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from megatron_r1v.models.r1v.vision import AllHeadsRMSNorm, ColumnParallelLinearNoBias, LayerScaleBiasDropoutAdd

    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )

        class TEColumnParallelLinearNoBias(TEColumnParallelLinear):
            def __init__(self, *args, bias: bool = False, **kwargs):
                super().__init__(*args, bias=False, **kwargs)

        norm, qkv, core, row, column = (
            TENorm, TEColumnParallelLinearNoBias, TEDotProductAttention, TERowParallelLinear, TEColumnParallelLinear,
        )
    elif backend == "local":
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from megatron_r1v.models.r1v.attention import SegmentAttention

        norm, qkv, core, row, column = (
            WrappedTorchNorm, ColumnParallelLinearNoBias, SegmentAttention, RowParallelLinear, ColumnParallelLinear,
        )
    else:
        raise ValueError(f"unknown backend {backend!r}")

    qk_norm = ModuleSpec(module=AllHeadsRMSNorm, params={"real_width": real_width, "tp_group": tp_group})
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv, core_attention=core, linear_proj=row, q_layernorm=qk_norm, k_layernorm=qk_norm
                ),
            ),
            self_attn_bda=ModuleSpec(module=LayerScaleBiasDropoutAdd, params={"hidden_size": real_width}),
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=_mlp_submodules(column, row)),
            mlp_bda=ModuleSpec(module=LayerScaleBiasDropoutAdd, params={"hidden_size": real_width}),
        ),
    )


def adapter_mlp_submodules(backend: Backend):
    """Column-parallel fc1 and row-parallel fc2 of the adapter, for the given backend."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return _mlp_submodules(TEColumnParallelLinear, TERowParallelLinear)
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return _mlp_submodules(ColumnParallelLinear, RowParallelLinear)


def _mlp_submodules(column, row):
    from megatron.core.transformer.mlp import MLPSubmodules

    return MLPSubmodules(linear_fc1=column, linear_fc2=row)


FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}


def fp8_transformer_kwargs(fp8, backend: Backend) -> dict:
    """TransformerConfig FP8 fields from ``model.fp8`` (see :class:`megatron_r1v.config.FP8Config`).

    FP8 runs only in Transformer Engine layers; asking for it with the local backend is
    a configuration error. ``current`` scaling is Megatron's ``tensorwise`` recipe.
    """
    from megatron_r1v.validation import check_fp8

    if fp8 is None or fp8.format is None:
        return {}
    check_fp8(fp8, backend)
    return {
        "fp8": fp8.format,
        "fp8_recipe": FP8_RECIPES[fp8.recipe],
        "fp8_margin": fp8.margin,
        "fp8_amax_history_len": fp8.amax_history_len,
        "fp8_amax_compute_algo": fp8.amax_compute_algo,
    }


def recompute_transformer_kwargs(model_cfg, num_layers: int) -> dict:
    """TransformerConfig activation-recomputation fields from ``model.recompute_*``.

    ``selective`` recomputes the core attention of every layer (Megatron's default module
    set); ``full`` recomputes whole layers, grouped by ``recompute_method``. The group size
    is capped at the block's layer count, so one setting serves the 45-layer vision tower
    and the 64-layer decoder alike.
    """
    granularity = model_cfg.recompute_granularity
    if granularity is None:
        return {}
    if granularity == "selective":
        return {"recompute_granularity": "selective"}
    assert model_cfg.recompute_num_layers >= 1, "validation.validate_config checks model.recompute_num_layers"
    return {"recompute_granularity": "full", "recompute_method": model_cfg.recompute_method,
            "recompute_num_layers": min(model_cfg.recompute_num_layers, num_layers)}
