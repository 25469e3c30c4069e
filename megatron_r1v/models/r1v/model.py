"""Building the R1V2 model in Megatron-Core (Eq. 1: y = f_l(f_c(f_v(x_v)), x_t)).

This module owns the translation from an architecture (:mod:`.presets`) and a parallel
layout to Megatron-Core configs and modules. The language model f_l is a ``GPTModel``
with the Qwen2 layer spec of :mod:`.spec`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r1v.models.r1v.presets import DecoderArch, R1VArch
from megatron_r1v.models.r1v.spec import Backend, decoder_layer_spec
from megatron_r1v.models.r1v.transformer_config import shared_config_kwargs

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
    fp8_kwargs: Optional[dict] = None,
    recompute_kwargs: Optional[dict] = None,
    cp: int = 1,
    cp_comm_type: str = "p2p",
) -> TransformerConfig:
    """Megatron TransformerConfig of a Qwen2 decoder (RMSNorm, QKV bias, SwiGLU, GQA).

    ``cp`` > 1: context parallelism in TE's attention (Megatron's ``TEDotProductAttention``
    passes ``cp_group``, ``cp_global_ranks``, ``cp_stream`` and ``cp_comm_type`` to TE when
    ``context_parallel_size`` > 1); only the decoder's config carries it, the vision tower
    attends within tiles that every CP rank encodes whole."""
    arch.check_parallel(tp, pp)
    fused = not on_cpu and backend == "te"
    cp_kwargs = {"context_parallel_size": cp, "cp_comm_type": cp_comm_type} if cp > 1 else {}
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
        bias_activation_fusion=fused,
        sequence_parallel=sequence_parallel,
        **cp_kwargs,
        **shared_config_kwargs(
            tp=tp, pp=pp, dtype=TORCH_DTYPES[params_dtype], on_cpu=on_cpu, fused_kernels=fused, fp8_kwargs=fp8_kwargs,
            recompute_kwargs=recompute_kwargs,
        ),
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
        # R1VModel scatters image features into the full sequence, then splits it for SP.
        scatter_embedding_sequence_parallel=False,
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


# Trainable top-level parts for each freeze policy (Table 4: adapter-only is best).
FREEZE_POLICIES: dict[str, tuple[str, ...]] = {
    "adapter": ("adapter",),
    "adapter+llm": ("adapter", "language_model"),
    "adapter+vision": ("adapter", "vision"),
    "all": ("adapter", "vision", "language_model"),
}


class R1VModel(MegatronModule):
    """Eq. 1 for one pipeline stage: InternViT -> adapter -> scatter -> Qwen2 decoder.

    The vision encoder and adapter exist on the first stage only. ``forward`` takes
    ``input_ids [B, S]`` holding ``tokens_per_tile`` IMG_CONTEXT ids per tile and
    ``pixel_values [N_tiles, 3, H, W]`` with tiles in the order their tokens appear
    (sample by sample, left to right); the adapter output replaces those embeddings.
    Attention is causal; ``packed_seq_params`` (THD, ``cu_seqlens``) makes a packed row
    ``[1, L]`` attend within each sample, and rotary positions restart at every sample.
    Returns masked vocab-parallel logits ``[B, S, V_pad / tp]`` on the last stage and
    hidden states ``[S, B, H]`` elsewhere.

    Context parallelism: ``input_ids`` is the whole row in the padded layout and
    ``cp_index`` this CP rank's positions in it (``models.r1v.context_parallel``); the first
    stage embeds the whole row and scatters the image features, then keeps those positions,
    so S is ``len(cp_index)`` from the decoder on.
    """

    def __init__(
        self,
        arch: R1VArch,
        language_model: GPTModel,
        *,
        vision: Optional[torch.nn.Module] = None,
        adapter: Optional[torch.nn.Module] = None,
        tp_rank: int = 0,
    ) -> None:
        super().__init__(config=language_model.config)
        self.arch = arch
        self.language_model = language_model
        self.vision = vision
        self.adapter = adapter
        self.tp_rank = tp_rank
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.model_type = language_model.model_type  # read by Megatron's schedules

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        # finalize_model_grads asks the pre_process module (us, not the GPTModel inside)
        # whether word-embedding grads must be all-reduced with the last stage's output layer.
        return self.language_model.share_embeddings_and_output_weights

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N_tiles, 3, H, W]`` -> ``[N_tiles, tokens_per_tile, H_llm]`` (f_c(f_v(x_v)))."""
        assert self.vision is not None and self.adapter is not None, "vision lives on the first stage"
        return self.adapter(self.vision(pixel_values))

    def _scatter_images(self, embeds_SBH: torch.Tensor, input_ids: torch.Tensor, images_NTH: torch.Tensor):
        if self.arch.image_token_id is None:
            raise ValueError("the model has no image token id: a run reads it from the tokenizer or the checkpoint "
                             "(trainer/arch.py); set the architecture's image_token_id")
        is_image_BS = input_ids == self.arch.image_token_id
        n_tokens, n_features = int(is_image_BS.sum()), images_NTH.shape[0] * images_NTH.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"the batch has {n_tokens} image tokens (id {self.arch.image_token_id}) but pixel_values give "
                f"{images_NTH.shape[0]} tiles x {images_NTH.shape[1]} tokens = {n_features} image features"
            )
        # Batch-major order, as transformers' masked_scatter on [B, S, H].
        embeds_BSH = embeds_SBH.transpose(0, 1)
        mask_BSH = is_image_BS.unsqueeze(-1).expand_as(embeds_BSH)
        embeds_BSH = embeds_BSH.masked_scatter(mask_BSH, images_NTH.to(embeds_BSH.dtype))
        return embeds_BSH.transpose(0, 1).contiguous()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        cp_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        decoder_input = None
        if self.pre_process:
            embeds_SBH = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
            if pixel_values is not None and pixel_values.shape[0] > 0:
                embeds_SBH = self._scatter_images(embeds_SBH, input_ids, self.image_embeddings(pixel_values))
            elif self.arch.image_token_id is not None and bool((input_ids == self.arch.image_token_id).any()):
                raise ValueError("input_ids contain image tokens but no pixel_values were given")
            if cp_index is not None:  # after the scatter: image features land where their tokens are
                embeds_SBH = embeds_SBH.index_select(0, cp_index.to(embeds_SBH.device))
            if self.config.sequence_parallel:
                embeds_SBH = tensor_parallel.scatter_to_sequence_parallel_region(embeds_SBH)
            decoder_input = embeds_SBH
        output = self.language_model(
            input_ids=None, position_ids=position_ids, attention_mask=None, decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
        )
        if self.post_process:
            output = mask_padded_vocab(output, self.arch.decoder.vocab_size, self.tp_rank)
        return output


def apply_freeze_policy(model: R1VModel, policy: str) -> list[str]:
    """Sets ``requires_grad`` by policy; returns the trainable parameter names of this stage.

    Frozen parameters get no ``.grad``; Megatron DDP allocates no gradient buffer and
    the optimizer no state for them.
    """
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"model.freeze must be one of {sorted(FREEZE_POLICIES)}, got {policy!r}")
    trainable_parts = FREEZE_POLICIES[policy]
    if model.arch.vision is None and "language_model" not in trainable_parts:
        raise ValueError(
            f"model.freeze={policy} trains nothing on a decoder-only preset (no vision/adapter); "
            "use adapter+llm or all"
        )
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".", 1)[0] in trainable_parts)
        if param.requires_grad:
            trainable.append(name)
    return trainable
