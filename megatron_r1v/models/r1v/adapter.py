"""The MLP adapter f_c of Eq. 1 (InternVL's ``mlp1``): pixel shuffle, LayerNorm, MLP.

Pixel shuffle with ratio r folds each (1/r x 1/r) block of vision tokens into one
token with 1/r^2 times the channels (1024 tokens x 3200 -> 256 x 12800 at r = 0.5).
InternVL has two token orders: ``v2`` ends with a spatial transpose that ``v1`` lacks;
a checkpoint trained with one order only works with that order.

The MLP is LayerNorm(eps 1e-5) -> Linear(in -> h) -> GELU -> Linear(h -> h) with
biases; the first linear is column-parallel, the second row-parallel, so the output
is replicated over TP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r1v.models.r1v.presets import AdapterArch
from megatron_r1v.models.r1v.transformer_config import shared_config_kwargs


def pixel_shuffle(x_NHWC: torch.Tensor, ratio: float, ps_version: str) -> torch.Tensor:
    """InternVL's pixel shuffle of ``[N, W, H, C]`` features -> ``[N, W*r, H*r, C/r^2]``.

    The first two dims are named (W, H) after InternVL's code: the features are the
    row-major patch grid reshaped to a square, and the reshapes below act on that
    layout exactly as InternVL's do, so token order matches the released checkpoints.
    """
    n, w, h, c = x_NHWC.shape
    if round(h * ratio) != h * ratio or round(w * ratio) != w * ratio:
        raise ValueError(f"pixel shuffle ratio {ratio} does not divide the {w}x{h} token grid")
    x = x_NHWC.reshape(n, w, int(h * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).reshape(n, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3)
    elif ps_version != "v1":
        raise ValueError(f"ps_version must be v1 or v2, got {ps_version!r}")
    return x.contiguous()


def adapter_transformer_config(base: TransformerConfig, hidden_size: int, arch: AdapterArch) -> TransformerConfig:
    """Config of the adapter MLP: width ``hidden_size`` in and out, exact GELU, biases."""
    fp8 = {k: getattr(base, k) for k in ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len",
                                          "fp8_amax_compute_algo")} if base.fp8 else None
    return TransformerConfig(
        num_layers=1,
        hidden_size=hidden_size,
        ffn_hidden_size=hidden_size,
        # Unused by an MLP, but TransformerConfig requires heads divisible by TP.
        num_attention_heads=base.tensor_model_parallel_size,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        bias_activation_fusion=False,  # Megatron's fused bias-GELU is the tanh approximation
        layernorm_epsilon=arch.norm_eps,
        perform_initialization=base.perform_initialization,
        **shared_config_kwargs(
            tp=base.tensor_model_parallel_size, pp=1, dtype=base.params_dtype,
            on_cpu=base.use_cpu_initialization, fused_kernels=False, fp8_kwargs=fp8,
        ),
    )


class VisionAdapter(MegatronModule):
    """``[N, tokens, C_vit]`` vision features -> ``[N, tokens * r^2, hidden]`` embeddings."""

    def __init__(self, arch: AdapterArch, input_size: int, config: TransformerConfig, mlp_submodules: MLPSubmodules):
        super().__init__(config=config)
        self.arch = arch
        self.layer_norm = torch.nn.LayerNorm(input_size, eps=arch.norm_eps, dtype=config.params_dtype)
        self.mlp = MLP(config=config, submodules=mlp_submodules, input_size=input_size)

    def forward(self, vision_NTC: torch.Tensor) -> torch.Tensor:
        n, tokens, c = vision_NTC.shape
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"vision features have {tokens} tokens per tile; the pixel shuffle needs a square grid")
        x = pixel_shuffle(vision_NTC.reshape(n, side, side, c), self.arch.downsample_ratio, self.arch.ps_version)
        x = self.layer_norm(x.reshape(n, -1, x.shape[-1]))
        out, bias = self.mlp(x)
        return out if bias is None else out + bias
