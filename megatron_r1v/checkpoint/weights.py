"""Moving tensors between a sharded Megatron model and HF-named tensors.

``load_hf_weights`` fills this rank's parameters from HF tensors fetched one name at a
time (a lazy safetensors reader, an in-memory state dict, ...). ``gather_hf_tensors``
does the reverse for parameters or gradients: TP shards are all-gathered, pipeline
stages are collected on global rank 0, and names come back through hf_mapping.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_r1v.models.r1v.hf_mapping import (
    HFLayout,
    ShardSpec,
    TensorMap,
    hf_to_mcore_shard,
    mcore_shards_to_hf,
    model_tensor_maps,
    stage_tensor_maps,
)
from megatron_r1v.models.r1v.presets import R1VArch
from megatron_r1v.platform import ParallelContext


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strips DDP / Float16Module wrappers (they nest the real model as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def model_stage_maps(arch: R1VArch, ctx: ParallelContext, layout: HFLayout, backend: str = "local") -> dict[str, TensorMap]:
    """The tensors of this rank's pipeline stage, keyed by their local parameter names."""
    maps = model_tensor_maps(arch, layout, backend=backend)
    return stage_tensor_maps(maps, arch.decoder.num_layers, ctx.pp_rank, ctx.pp, mcore_prefix="language_model.")


def load_hf_weights(
    model: torch.nn.Module,
    stage_maps: dict[str, TensorMap],
    spec: ShardSpec,
    ctx: ParallelContext,
    get_hf_tensor: Callable[[str], torch.Tensor],
) -> None:
    """Copies HF tensors into this rank's parameters; every parameter must be covered."""
    params = dict(unwrap_model(model).named_parameters())
    unknown = sorted(set(params) - set(stage_maps))
    absent = sorted(set(stage_maps) - set(params))
    if unknown or absent:
        raise ValueError(
            f"model and HF mapping disagree on stage {ctx.pp_rank}: parameters without a mapping "
            f"{unknown[:5]}, mapped names missing from the model {absent[:5]}"
        )
    for local_name, tm in stage_maps.items():
        hf = {}
        for hf_name in tm.hf:
            try:
                hf[hf_name] = get_hf_tensor(hf_name)
            except KeyError:
                raise KeyError(f"HF checkpoint has no tensor {hf_name!r} (needed for {tm.mcore})") from None
        shard = hf_to_mcore_shard(tm, hf, spec, ctx.tp, ctx.tp_rank)
        param = params[local_name]
        if shard.shape != param.shape:
            hf_shapes = {name: tuple(t.shape) for name, t in hf.items()}
            raise ValueError(
                f"tensor {local_name} from HF {hf_shapes}: built shard shape {tuple(shard.shape)} but the model "
                f"expects {tuple(param.shape)} (tp={ctx.tp}, tp_rank={ctx.tp_rank}); does the checkpoint "
                "match the preset?"
            )
        with torch.no_grad():
            param.copy_(shard.to(param.dtype))


def _local_tensor(param: torch.nn.Parameter, grads: bool) -> torch.Tensor:
    if not grads:
        return param.detach()
    # Megatron DDP accumulates into main_grad; a bare module into .grad.
    grad = getattr(param, "main_grad", None)
    if grad is None:
        grad = param.grad
    if grad is None:
        return torch.zeros_like(param)
    return grad.detach().to(param.dtype) if grad.dtype != param.dtype else grad.detach()


def iter_stage_hf_tensors(
    params: dict[str, torch.nn.Parameter],
    stage_maps: dict[str, TensorMap],
    spec: ShardSpec,
    ctx: ParallelContext,
    *,
    grads: bool = False,
    include: Optional[Callable[[torch.nn.Parameter], bool]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's parameters (or gradients) under HF names, one Megatron tensor at a time.

    Collective over the TP group (each tensor's shards are all-gathered); the HF tensors
    come out on the stage's first TP rank only. ``include`` filters parameters and must
    answer the same on every TP rank (e.g. ``requires_grad``, set by name).
    """
    for local_name, tm in stage_maps.items():
        param = params[local_name]
        if include is not None and not include(param):
            continue
        local = _local_tensor(param, grads).contiguous()
        if ctx.tp > 1:
            shards = [torch.empty_like(local) for _ in range(ctx.tp)]
            dist.all_gather(shards, local, group=ctx.tp_group)
        else:
            shards = [local]
        if ctx.tp_rank == 0:
            yield from mcore_shards_to_hf(tm, shards, spec).items()


def gather_hf_tensors(
    model: torch.nn.Module,
    stage_maps: dict[str, TensorMap],
    spec: ShardSpec,
    ctx: ParallelContext,
    *,
    grads: bool = False,
) -> Optional[dict[str, torch.Tensor]]:
    """All parameters (or gradients) under HF names, on global rank 0; None elsewhere.

    Collective over the whole world: every rank must call it. Meant for tests, checks
    and small models; the checkpoint converter streams tensor by tensor instead.
    """
    params = dict(unwrap_model(model).named_parameters())
    stage = {k: v.cpu() for k, v in iter_stage_hf_tensors(params, stage_maps, spec, ctx, grads=grads)}
    per_stage: list[Optional[dict]] = [None] * ctx.pp
    dist.all_gather_object(per_stage, stage if ctx.tp_rank == 0 else {}, group=ctx.pp_group)
    if ctx.rank != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in per_stage:
        merged.update(part or {})
    return merged
