"""Building the R1V2 model in Megatron-Core (Eq. 1: y = f_l(f_c(f_v(x_v)), x_t)).

This module owns the translation from an architecture (:mod:`.presets`) and a parallel
layout to Megatron-Core configs and modules. The language model f_l is a ``GPTModel``
with the Qwen2 layer spec of :mod:`.spec`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r1v.models.r1v.presets import DecoderArch
from megatron_r1v.models.r1v.spec import Backend, decoder_layer_spec

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def decoder_transformer_config(
    arch: DecoderArch,
    *,
    tp: int = 1,
    pp: int = 1,
    sequence_parallel: bool = False,
    params_dtype: str = "fp32",
    backend: Backend = "local",
    on_cpu: bool = False,
) -> TransformerConfig:
    """Megatron TransformerConfig of a Qwen2 decoder.

    On CPU, weights are initialized as full master tensors and sliced (identical values
    for any TP), and the CUDA-only fused kernels are switched off.
    """
    arch.check_parallel(tp, pp)
    dtype = TORCH_DTYPES[params_dtype]
    gpu_fusions = not on_cpu
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        bias_activation_fusion=gpu_fusions and backend == "te",
        bias_dropout_fusion=gpu_fusions,
        masked_softmax_fusion=gpu_fusions,
        persist_layer_norm=gpu_fusions,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def build_language_model(
    arch: DecoderArch,
    config: TransformerConfig,
    *,
    backend: Backend,
    padded_vocab_size: int,
    pre_process: bool,
    post_process: bool,
) -> GPTModel:
    """The Qwen2 decoder as a Megatron ``GPTModel`` for one pipeline stage.

    Outputs (when ``post_process``) vocab-parallel logits ``[B, S, V_padded / tp]``;
    apply :func:`mask_padded_vocab` before any softmax over them.
    """
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_layer_spec(backend),
        vocab_size=padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not arch.untie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rotary_percent=1.0,
    )


def mask_padded_vocab(logits_BSv: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Sets the logits of TP-padding vocabulary rows to the dtype's minimum.

    ``logits_BSv`` is this rank's vocab slice ``[..., V_padded / tp]``. Padding rows have
    zero weights, so unmasked they would add ``exp(0)`` terms to every softmax. The
    minimum (not -inf) keeps ``p * logit`` finite in entropy terms.
    """
    shard = logits_BSv.shape[-1]
    first = tp_rank * shard
    n_real = max(0, min(shard, vocab_size - first))
    if n_real == shard:
        return logits_BSv
    fill = torch.finfo(logits_BSv.dtype).min
    return torch.cat(
        [logits_BSv[..., :n_real], logits_BSv.new_full((*logits_BSv.shape[:-1], shard - n_real), fill)], dim=-1
    )


def causal_attention_mask(seq_len: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Megatron's boolean mask convention: ``True`` marks positions NOT attended. [1,1,S,S]"""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)
