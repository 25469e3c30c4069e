"""The Megatron-Core ``TransformerConfig`` fields shared by every block of the model.

Its own module so that the blocks (:mod:`.vision`, :mod:`.adapter`) and the model that
assembles them (:mod:`.model`, through :mod:`.spec`) import it without importing each
other.
"""

from __future__ import annotations

from typing import Optional

import torch


def shared_config_kwargs(
    *, tp: int, pp: int, dtype: torch.dtype, on_cpu: bool, fused_kernels: bool, fp8_kwargs: Optional[dict] = None,
    recompute_kwargs: Optional[dict] = None,
) -> dict:
    """TransformerConfig fields every block of the model sets the same way.

    On CPU, weights are initialized as full master tensors and sliced (identical values
    for any TP). Fused kernels (masked softmax, persistent LayerNorm, bias-dropout-add,
    bias-activation) come with Transformer Engine / apex, so callers enable them only
    for the TE backend on GPU.
    """
    return {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_cpu_initialization": on_cpu,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bias_dropout_fusion": fused_kernels,
        "masked_softmax_fusion": fused_kernels,
        "persist_layer_norm": fused_kernels,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        **(fp8_kwargs or {}),
        **(recompute_kwargs or {}),
    }
