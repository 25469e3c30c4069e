"""Core attention of the local backend: attends within segments, never builds an L x L tensor.

Packed rows reach the decoder as Megatron's ``PackedSeqParams`` (``qkv_format='thd'``):
``query [T, n/tp, d]``, ``key``/``value [T, g/tp, d]`` with the row's samples back to back
and ``cu_seqlens`` marking where each starts. Transformer Engine's ``TEDotProductAttention``
runs its fused varlen kernel on them; :class:`SegmentAttention` is the same contract for
Megatron's local modules (the CPU mode, or GPUs without TE): each segment is attended on its
own with ``torch.nn.functional.scaled_dot_product_attention`` (causal for the decoder,
full for a vision tile), so activation memory grows as sum(l_i^2) at worst (the math path)
and as sum(l_i) with a flash kernel (PyTorch's CPU and CUDA ones), never as L^2.

Batches without ``PackedSeqParams`` (``[s, b, n, d]``: unpacked rows, or the vision tower's
tiles, which are its batch dimension) are attended per batch row the same way. Megatron's
local ``DotProductAttention`` refuses packed sequences and would need the dense mask this
module replaces; a dense ``attention_mask`` is refused here rather than silently ignored.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


class SegmentAttention(MegatronModule):
    """Drop-in core attention for ``SelfAttentionSubmodules.core_attention`` (local backend).

    Same constructor as Megatron's ``DotProductAttention``; ``forward`` returns
    ``[T, n/tp * d]`` for THD input and ``[s, b, n/tp * d]`` otherwise, as Megatron's
    attention expects. Grouped-query attention is handled by SDPA (``enable_gqa``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine's attention (model.backend=te)")
        # TransformerConfig has checked that heads and query groups split over TP.
        tp_size = pg_collection.tp.size() if pg_collection is not None else config.tensor_model_parallel_size
        self.heads_per_rank = config.num_attention_heads // tp_size
        self.groups_per_rank = config.num_query_groups // tp_size
        self.head_dim = config.kv_channels
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        dense = attention_mask if attention_bias is None else attention_bias
        if dense is not None:
            raise ValueError("SegmentAttention takes segments (PackedSeqParams) and a mask type, not a dense "
                             f"attention mask {tuple(dense.shape)}")
        causal = (self.attn_mask_type if attn_mask_type is None else attn_mask_type) in _CAUSAL
        # value is a view of the fused QKV projection's output; saved as it is, it would keep
        # that whole buffer alive until backward (q and k leave it through RoPE / q-k norms).
        value = value.contiguous()
        if packed_seq_params is None:
            # [s, b, n, d] -> [b, n, s, d]: each batch row is one segment.
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            out_BNSD = self._attend(q, k, v, causal)
            seq, batch = query.shape[0], query.shape[1]
            return out_BNSD.permute(2, 0, 1, 3).reshape(seq, batch, self.heads_per_rank * self.head_dim)
        return self._attend_segments(query, key, value, packed_seq_params, causal)

    def _attend_segments(self, query_TND, key_TGD, value_TGD, params: PackedSeqParams, causal: bool) -> torch.Tensor:
        if params.qkv_format != "thd":
            raise ValueError("SegmentAttention reads packed rows in the thd format, "
                             f"got qkv_format={params.qkv_format!r}")
        bounds = _segment_bounds(params, query_TND.shape[0])
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end == start:
                continue
            q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query_TND, key_TGD, value_TGD))
            outputs.append(self._attend(q, k, v, causal)[0].transpose(0, 1))
        out_TND = torch.cat(outputs) if outputs else query_TND.new_zeros(query_TND.shape)
        return out_TND.reshape(query_TND.shape[0], self.heads_per_rank * self.head_dim)

    def _attend(self, q_BNSD, k_BGSD, v_BGSD, causal: bool) -> torch.Tensor:
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(is_causal=causal, scale=self.softmax_scale, dropout_p=dropout,
                      enable_gqa=self.heads_per_rank != self.groups_per_rank)
        if dropout and not self.config.sequence_parallel:
            # As Megatron's DotProductAttention: TP ranks hold different heads, so they draw
            # from the model-parallel RNG stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, **kwargs)
        return F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, **kwargs)


def _segment_bounds(params: PackedSeqParams, num_tokens: int) -> list[int]:
    cu_q = params.cu_seqlens_q if params.cu_seqlens_q_padded is None else params.cu_seqlens_q_padded
    cu_kv = params.cu_seqlens_kv if params.cu_seqlens_kv_padded is None else params.cu_seqlens_kv_padded
    if cu_q is None or (cu_kv is not None and not torch.equal(cu_q, cu_kv)):
        raise ValueError("SegmentAttention is self-attention over one packed row: cu_seqlens_q must be given and "
                         "equal cu_seqlens_kv")
    bounds = cu_q.tolist()
    if bounds[0] != 0 or bounds[-1] != num_tokens or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens {bounds} do not cover the row's {num_tokens} tokens in order")
    return bounds
