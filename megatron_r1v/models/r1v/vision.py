"""InternViT (f_v of Eq. 1) as a Megatron-Core TransformerBlock with project-owned modules.

InternViT-6B differs from a standard ViT layer in four ways, each a module here that
the layer spec in :mod:`.spec` plugs into Megatron's ``TransformerLayer``:

* :class:`AllHeadsRMSNorm`: q and k are RMS-normalized over ALL heads together (3200
  dims), not per head. Under TP each rank holds some heads, so the sum of squares is
  all-reduced over the TP group and divided by the real width (not the padded one).
* dummy heads: 25 heads do not split over TP=2/4/8, so the attention is built with the
  heads padded to a multiple of TP; the extra heads have zero q/k/v rows, zero q/k norm
  entries and zero output-projection columns, so they contribute exactly nothing.
* :class:`LayerScaleBiasDropoutAdd`: the residual branch is scaled per channel
  (``ls1``/``ls2``) before it is added.
* :class:`ColumnParallelLinearNoBias`: QKV without bias while every other linear layer
  has one (Megatron ties both to ``add_bias_linear``).

The encoder returns the last layer's tokens without the class token and without a
final norm, as InternVL feeds them to the adapter.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r1v.models.r1v.presets import VisionArch
from megatron_r1v.models.r1v.transformer_config import shared_config_kwargs


class _AllReduceSum(torch.autograd.Function):
    """All-reduce (sum) whose backward is also an all-reduce (sum).

    Every rank uses the reduced value for its own heads, so the gradient reaching each
    rank's partial sum is the sum of all ranks' upstream gradients.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class AllHeadsRMSNorm(torch.nn.Module):
    """RMSNorm over all attention heads of q (or k): ``x * rsqrt(mean_all(x^2) + eps) * w``.

    Receives ``[S, B, heads_local, head_dim]`` from Megatron's SelfAttention; the weight
    is this rank's slice ``[heads_local * head_dim]`` of the padded width.
    """

    def __init__(
        self,
        hidden_size: int,
        config: TransformerConfig,
        eps: float = 1e-6,
        *,
        real_width: int,
        tp_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        tp = config.tensor_model_parallel_size
        heads_local = config.num_attention_heads // tp
        self.local_width = heads_local * hidden_size
        self.real_width = real_width
        self.eps = eps
        self.tp_group = tp_group
        self.tp = tp
        self.weight = torch.nn.Parameter(torch.ones(self.local_width, dtype=config.params_dtype))

    def forward(self, x_SBNH: torch.Tensor) -> torch.Tensor:
        shape = x_SBNH.shape
        flat = x_SBNH.reshape(*shape[:-2], self.local_width).float()
        sum_sq = flat.pow(2).sum(-1, keepdim=True)
        if self.tp > 1:
            sum_sq = _AllReduceSum.apply(sum_sq, self.tp_group)
        normed = flat * torch.rsqrt(sum_sq / self.real_width + self.eps)
        return (self.weight * normed.to(x_SBNH.dtype)).reshape(shape)


class LayerScaleBiasDropoutAdd(torch.nn.Module):
    """``residual + dropout(ls * (x + bias))`` with a learned per-channel ``ls``.

    Megatron calls ``bda(training, fused)(x_with_bias, residual, p)``; this module keeps
    that calling convention so it drops into ``TransformerLayerSubmodules``.
    """

    def __init__(self, hidden_size: int, init_value: float = 1.0, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), init_value, dtype=params_dtype))

    def forward(self, training: bool, fused: bool = False):
        def bias_dropout_add(x_with_bias, residual: torch.Tensor, prob: float) -> torch.Tensor:
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            return residual + F.dropout(self.weight * x, p=prob, training=training)

        return bias_dropout_add


class ColumnParallelLinearNoBias(ColumnParallelLinear):
    """ColumnParallelLinear that never has a bias (InternViT's QKV)."""

    def __init__(self, *args, bias: bool = False, **kwargs):
        super().__init__(*args, bias=False, **kwargs)


def padded_heads(num_heads: int, tp: int) -> int:
    """Heads rounded up to a multiple of TP (25 -> 26 / 28 / 32 at TP 2 / 4 / 8)."""
    return -(-num_heads // tp) * tp


def vision_transformer_config(
    arch: VisionArch, *, tp: int, params_dtype: torch.dtype, on_cpu: bool, fp8_kwargs: Optional[dict] = None,
    recompute_kwargs: Optional[dict] = None,
) -> TransformerConfig:
    """TransformerConfig of the InternViT encoder (whole encoder on one pipeline stage)."""
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=padded_heads(arch.num_attention_heads, tp),
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=False,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact (erf) GELU, as InternViT
        bias_activation_fusion=False,  # Megatron's fused bias-GELU is the tanh approximation
        qk_layernorm=True,  # the spec's AllHeadsRMSNorm; Megatron >= 0.19 checks config and spec agree
        # pp=1: the whole encoder lives on the first pipeline stage. No mask in the ViT,
        # so the fused masked softmax (apex/TE) buys nothing.
        **shared_config_kwargs(
            tp=tp, pp=1, dtype=params_dtype, on_cpu=on_cpu, fused_kernels=False, fp8_kwargs=fp8_kwargs,
            recompute_kwargs=recompute_kwargs,
        ),
    )


class InternViT(MegatronModule):
    """Patch embedding + class token + positions -> TransformerBlock -> tokens without cls.

    Input ``pixel_values [N_tiles, 3, H, W]``; output ``[N_tiles, (H/14)*(W/14), hidden]``.
    The embeddings are small and replicated over TP; the block is tensor parallel.
    """

    def __init__(self, arch: VisionArch, config: TransformerConfig, layer_spec: ModuleSpec) -> None:
        super().__init__(config=config)
        self.arch = arch
        self.patch_embed = torch.nn.Conv2d(
            arch.num_channels, arch.hidden_size, kernel_size=arch.patch_size, stride=arch.patch_size, bias=True,
            dtype=config.params_dtype,
        )
        self.class_token = torch.nn.Parameter(torch.zeros(1, 1, arch.hidden_size, dtype=config.params_dtype))
        self.position_embeddings = torch.nn.Parameter(
            torch.zeros(1, arch.num_positions, arch.hidden_size, dtype=config.params_dtype)
        )
        self.encoder = TransformerBlock(config=config, spec=layer_spec, post_layer_norm=False)
        self.zero_dummy_heads_()

    @property
    def num_dummy_heads(self) -> int:
        return self.config.num_attention_heads - self.arch.num_attention_heads

    @torch.no_grad()
    def zero_dummy_heads_(self) -> None:
        """Zeroes the dummy heads' q/k/v rows, q/k norm entries and projection columns."""
        if self.num_dummy_heads == 0:
            return
        d = self.arch.head_dim
        tp = self.config.tensor_model_parallel_size
        heads_local = self.config.num_attention_heads // tp
        tp_rank = dist.get_rank(self.encoder.tp_group) if tp > 1 else 0
        first = tp_rank * heads_local
        dummy_local = [h - first for h in range(self.arch.num_attention_heads, self.config.num_attention_heads)
                       if first <= h < first + heads_local]
        for layer in self.encoder.layers:
            attn = layer.self_attention
            qkv = attn.linear_qkv.weight.view(heads_local, 3 * d, -1)
            for h in dummy_local:
                qkv[h].zero_()
                attn.linear_proj.weight[:, h * d : (h + 1) * d].zero_()
                attn.q_layernorm.weight[h * d : (h + 1) * d].zero_()
                attn.k_layernorm.weight[h * d : (h + 1) * d].zero_()

    def set_input_tensor(self, input_tensor) -> None:  # never pipelined: lives on stage 0
        pass

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [N, C, h, w]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
        if x.shape[1] + 1 != self.position_embeddings.shape[1]:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} give {x.shape[1]} patches; the encoder has "
                f"{self.position_embeddings.shape[1] - 1} positions ({self.arch.image_size}px tiles)"
            )
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embeddings
        out_SNC = self.encoder(x.transpose(0, 1).contiguous(), attention_mask=None)
        return out_SNC[1:].transpose(0, 1)  # drop the class token -> [N, h*w, C]
