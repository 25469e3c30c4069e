"""Model and optimizer construction for one rank: R1V stage model, Megatron DDP, optimizer.

The optimizer is Megatron-Core's (``get_megatron_optimizer``): Adam(W) with global
grad-norm clipping over the model-parallel group, fp32 main params for bf16 models,
and optionally the distributed optimizer (state sharded over data-parallel ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r1v.checkpoint.weights import model_stage_maps
from megatron_r1v.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_r1v.models.r1v.adapter import VisionAdapter, adapter_transformer_config
from megatron_r1v.models.r1v.hf_mapping import HFLayout, ShardSpec, TensorMap
from megatron_r1v.models.r1v.model import (
    TORCH_DTYPES,
    R1VModel,
    apply_freeze_policy,
    build_language_model,
    decoder_transformer_config,
)
from megatron_r1v.models.r1v.presets import R1VArch
from megatron_r1v.models.r1v.spec import (
    adapter_mlp_submodules,
    fp8_transformer_kwargs,
    recompute_transformer_kwargs,
    vision_layer_spec,
)
from megatron_r1v.models.r1v.vision import InternViT, vision_transformer_config
from megatron_r1v.platform import ParallelContext
from megatron_r1v.validation import check_context_parallel_arch, check_model_on_machine


@dataclass
class ModelStage:
    """This rank's piece of the model and the facts needed to map it to HF names."""

    model: R1VModel
    config: TransformerConfig
    """The language model's TransformerConfig (what the schedules read)."""
    arch: R1VArch
    backend: str
    shard_spec: ShardSpec
    stage_maps: dict[str, TensorMap]
    trainable: list[str]
    """Names of this stage's parameters that train under the freeze policy."""


def build_model_stage(
    arch: R1VArch,
    ctx: ParallelContext,
    model_cfg: ModelConfig,
    *,
    layout: HFLayout,
    sequence_parallel: bool = False,
    meta_device: bool = False,
    cp_comm_type: str = "p2p",
) -> ModelStage:
    """Builds this rank's :class:`R1VModel` stage (vision + adapter on the first stage only).

    ``meta_device``: build under ``torch.device("meta")`` for shape and size queries;
    weights are neither initialized nor moved. ``cp_comm_type``: ``parallel.cp_comm_type``
    (context parallelism's size is ``ctx.cp``). Megatron's DDP and distributed optimizer
    take their groups from its parallel state: gradients are reduced, and optimizer state
    sharded, over DP x CP (``wrap_ddp``).
    """
    on_cpu = ctx.device.type == "cpu"
    parallel = ParallelConfig(tp=ctx.tp, pp=ctx.pp, cp=ctx.cp, sequence_parallel=sequence_parallel,
                              cp_comm_type=cp_comm_type)
    backend = check_model_on_machine(model_cfg, parallel, ctx.device.type)
    arch.check_parallel(ctx.tp, ctx.pp)
    check_context_parallel_arch(arch, parallel)
    fp8 = fp8_transformer_kwargs(model_cfg.fp8, backend)
    config = decoder_transformer_config(
        arch.decoder, tp=ctx.tp, pp=ctx.pp, sequence_parallel=sequence_parallel,
        params_dtype=model_cfg.params_dtype, backend=backend, on_cpu=on_cpu or meta_device, fp8_kwargs=fp8,
        recompute_kwargs=recompute_transformer_kwargs(model_cfg, arch.decoder.num_layers // ctx.pp),
        # Shapes do not depend on CP: a meta build (sizes only, local backend) leaves it out.
        cp=1 if meta_device else ctx.cp, cp_comm_type=cp_comm_type,
    )
    config.perform_initialization = not meta_device
    shard_spec = ShardSpec.for_model(arch, ctx.tp, model_cfg.make_vocab_size_divisible_by, model_cfg.vocab_pad_tp)
    language_model = build_language_model(
        arch.decoder, config, backend=backend, padded_vocab_size=shard_spec.padded_vocab_size,
        pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage,
    )
    vision = adapter = None
    if arch.vision is not None and ctx.is_first_stage:
        vision, adapter = _build_vision_and_adapter(arch, ctx, model_cfg, config, backend, fp8, on_cpu or meta_device)
    model = R1VModel(arch, language_model, vision=vision, adapter=adapter, tp_rank=ctx.tp_rank)
    if not meta_device:
        model.to(ctx.device)
    trainable = apply_freeze_policy(model, model_cfg.freeze)
    return ModelStage(
        model=model,
        config=config,
        arch=arch,
        backend=backend,
        shard_spec=shard_spec,
        stage_maps=model_stage_maps(arch, ctx, layout, backend),
        trainable=trainable,
    )


def _build_vision_and_adapter(arch: R1VArch, ctx: ParallelContext, model_cfg: ModelConfig, config, backend: str,
                              fp8: dict, on_cpu: bool) -> tuple:
    """The first stage's InternViT and MLP adapter (``on_cpu``: CPU or meta build, no CUDA init)."""
    meta_device = not config.perform_initialization
    vision_config = vision_transformer_config(
        arch.vision, tp=ctx.tp, params_dtype=config.params_dtype, on_cpu=on_cpu, fp8_kwargs=fp8,
        recompute_kwargs=recompute_transformer_kwargs(model_cfg, arch.vision.num_layers),
    )
    vision_config.perform_initialization = not meta_device
    vision = InternViT(
        arch.vision, vision_config,
        vision_layer_spec(backend, real_width=arch.vision.hidden_size, tp_group=ctx.tp_group),
    )
    assert arch.adapter is not None
    adapter = VisionAdapter(
        arch.adapter, arch.adapter_input_size,
        adapter_transformer_config(config, arch.decoder.hidden_size, arch.adapter),
        adapter_mlp_submodules(backend),
    )
    return vision, adapter


def wrap_ddp(
    model: torch.nn.Module, config: TransformerConfig, *, use_distributed_optimizer: bool = False
) -> DistributedDataParallel:
    """Megatron DDP: contiguous fp32 grad buffers (``param.main_grad``), averaged over DP x CP
    (Megatron's default ``dp_cp_group``; its schedule multiplies each CP rank's loss by the CP
    size, so the CP ranks' gradients add up)."""
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


def build_lr_scheduler(optimizer: MegatronOptimizer, cfg: OptimizerConfig, total_steps: int):
    """Megatron's learning-rate scheduler for a run of ``total_steps`` training steps:
    linear warm-up from 0 over ``cfg.lr_warmup_steps``, then ``cfg.lr_decay_style`` down to
    ``cfg.min_lr`` at the last step. Advance it once per training step with ``step(1)``
    (a resumed run: ``step(steps_done)`` once, as the schedule depends on the count only)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps, lr_decay_steps=max(total_steps, cfg.lr_warmup_steps + 1),
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
    )
