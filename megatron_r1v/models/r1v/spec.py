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
        return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm")
    raise ValueError(f"unknown backend {backend!r}")
