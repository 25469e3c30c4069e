"""Model and optimizer construction for one rank: stage model, Megatron DDP, optimizer.

The optimizer is Megatron-Core's (``get_megatron_optimizer``): Adam(W) with global
grad-norm clipping over the model-parallel group, fp32 main params for bf16 models,
and optionally the distributed optimizer (state sharded over data-parallel ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r1v.config import ModelConfig, OptimizerConfig
from megatron_r1v.models.r1v.hf_mapping import HFDecoderNames, QWEN2_CAUSAL_LM, ShardSpec, TensorMap
from megatron_r1v.models.r1v.model import TORCH_DTYPES, build_language_model, decoder_transformer_config
from megatron_r1v.models.r1v.presets import DecoderArch
from megatron_r1v.models.r1v.spec import resolve_backend
from megatron_r1v.models.r1v.weights import decoder_stage_maps
from megatron_r1v.platform import ParallelContext


@dataclass
class DecoderStage:
    """This rank's piece of the language model and the facts needed to map it."""

    model: GPTModel
    config: TransformerConfig
    arch: DecoderArch
    backend: str
    shard_spec: ShardSpec
    stage_maps: dict[str, TensorMap]


def build_decoder_stage(
    arch: DecoderArch,
    ctx: ParallelContext,
    model_cfg: ModelConfig,
    *,
    sequence_parallel: bool = False,
    hf_names: HFDecoderNames = QWEN2_CAUSAL_LM,
) -> DecoderStage:
    backend = resolve_backend(model_cfg.backend)
    on_cpu = ctx.device.type == "cpu"
    if on_cpu and model_cfg.params_dtype != "fp32":
        raise ValueError(f"model.params_dtype={model_cfg.params_dtype}: the CPU mode runs fp32 only")
    config = decoder_transformer_config(
        arch, tp=ctx.tp, pp=ctx.pp, sequence_parallel=sequence_parallel,
        params_dtype=model_cfg.params_dtype, backend=backend, on_cpu=on_cpu,
    )
    padded = arch.padded_vocab_size(ctx.tp, model_cfg.make_vocab_size_divisible_by)
    model = build_language_model(
        arch, config, backend=backend, padded_vocab_size=padded,
        pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage,
    )
    model.to(ctx.device)
    return DecoderStage(
        model=model,
        config=config,
        arch=arch,
        backend=backend,
        shard_spec=ShardSpec.for_decoder(arch, padded),
        stage_maps=decoder_stage_maps(arch, ctx, hf_names, backend),
    )


def wrap_ddp(
    model: torch.nn.Module, config: TransformerConfig, *, use_distributed_optimizer: bool = False
) -> DistributedDataParallel:
    """Megatron DDP: contiguous fp32 grad buffers (``param.main_grad``), averaged over DP."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        average_in_collective=False,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(
    model_chunks: list[torch.nn.Module], cfg: OptimizerConfig, params_dtype: str
) -> MegatronOptimizer:
    dtype = TORCH_DTYPES[params_dtype]
    mcore_cfg = McoreOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    return get_megatron_optimizer(mcore_cfg, model_chunks)
