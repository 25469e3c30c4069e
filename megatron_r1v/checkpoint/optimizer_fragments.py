"""Optimizer state as TP/PP/DP-independent fragments, saved and loaded like the model's.

Megatron's own ``sharded_state_dict`` of an optimizer needs one ShardedTensor per parameter
from the model's ``sharded_state_dict``; our model checkpoints split some parameters into
several fragments (SwiGLU fc1 as gate/up, InternViT attention per real head,
``model_fragments.tensor_fragments``) so that they load at any TP. This module therefore
puts every per-parameter optimizer tensor into the same fragment scheme, under its own key:

    optimizer/exp_avg/<global name>      Adam's first moment
    optimizer/exp_avg_sq/<global name>   Adam's second moment
    optimizer/main_param/<global name>   the fp32 main copy (only for bf16/fp16 parameters:
                                         an fp32 parameter is its own main copy, saved in model/)

Each tensor has the shape of the parameter (this rank's TP piece), so the file holds exactly
the global tensors and any TP / PP / DP reads the pieces it needs.

* Non-distributed optimizers (Megatron's FP32Optimizer, Float16OptimizerWithFloat16Params):
  the state has the parameter's shape already; DP replicas are replicas (DP rank 0 writes).
* DistributedOptimizer: each DP rank holds a contiguous range of each flattened parameter.
  Saving reduces the pieces of a parameter onto one owner rank (parameter i of this rank's
  sorted names goes to DP rank i mod dp, so every DP rank writes about 1/dp of the state and
  holds at most that much extra in host memory); loading reads the whole tensor (this rank's
  TP piece) and keeps its own range: the new DP size may be anything.

Scalar state (Adam's step count, the fp16 loss scaler) is common to all ranks and travels in
the checkpoint's common part.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_r1v.checkpoint.model_fragments import tensor_fragments
from megatron_r1v.models.r1v.hf_mapping import ShardSpec, TensorMap

MOMENTS = ("exp_avg", "exp_avg_sq")
MAIN = "main_param"
OPTIMIZER_PREFIX = "optimizer"


@dataclass
class ParamSlot:
    """One trainable parameter as one optimizer holds it."""

    name: str
    """The parameter's local name (a key of the stage's TensorMaps)."""
    model_param: torch.nn.Parameter
    main: Optional[torch.Tensor]
    """The optimizer's parameter (fp32 main copy or the model parameter); None: a distributed
    optimizer whose range on this DP rank misses this parameter."""
    inner: Optional[torch.optim.Optimizer]
    flat_range: Optional[tuple[int, int]] = None
    """Distributed optimizer: this DP rank's [start, end) of the flattened parameter."""
    group: Optional[dist.ProcessGroup] = None
    """Distributed optimizer: the group the state is sharded over."""

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def state(self) -> dict:
        return {} if self.main is None else self.inner.state[self.main]


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _distributed_slots(opt, names: dict[int, str], trainable: list[torch.nn.Parameter]) -> list[ParamSlot]:
    slots = []
    group = opt.data_parallel_group
    # The parameters this optimizer steps: those of its grad buffers (model_param_gbuf_map only
    # holds the ones with a range on this DP rank).
    mine = {id(p) for buffer in opt.buffers for p in buffer.param_index_map}
    for param in trainable:
        if id(param) not in mine:
            continue  # another sub-optimizer's parameter
        main, inner, span = None, opt.optimizer, None
        if param in opt.model_param_group_index_map:
            g, order = opt.model_param_group_index_map[param]
            main = opt.optimizer.param_groups[g]["params"][order]
            rng = opt._get_model_param_range_map(param)["param"]
            span = (rng.start, rng.end)
        slots.append(ParamSlot(names[id(param)], param, main, inner, span, group))
    return slots


def _local_slots(opt, names: dict[int, str]) -> list[ParamSlot]:
    if hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params
        pairs = [(model, main) for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups)
                 for model, main in zip(models, mains)]
        pairs += [(p, p) for group in opt.fp32_from_fp32_groups for p in group]
    else:  # FP32Optimizer: the optimizer steps the model parameters themselves
        pairs = [(p, p) for group in opt.optimizer.param_groups for p in group["params"]]
    return [ParamSlot(names[id(model)], model, main, opt.optimizer) for model, main in pairs if id(model) in names]


def param_slots(optimizer, model: torch.nn.Module) -> list[ParamSlot]:
    """Every trainable parameter of ``model`` with its optimizer state, sorted by name (the
    same order on every DP rank of a model-parallel position)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_r1v.checkpoint.weights import unwrap_model

    named = [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]
    names = {id(p): n for n, p in named}
    slots: list[ParamSlot] = []
    for opt in _sub_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or getattr(opt, "optimizer", None) is None:
            continue  # no trainable parameter on this rank
        if getattr(getattr(opt, "config", None), "use_precision_aware_optimizer", False):
            raise NotImplementedError("optimizer.use_precision_aware_optimizer: its scaled state is not "
                                      "checkpointed by megatron_r1v (checkpoint/optimizer_fragments.py)")
        if isinstance(opt, DistributedOptimizer):
            slots += _distributed_slots(opt, names, [p for _, p in named])
        else:
            slots += _local_slots(opt, names)
    missing = sorted(set(names.values()) - {s.name for s in slots})
    if missing:
        raise ValueError(f"trainable parameter {missing[0]!r} is in no optimizer")
    return sorted(slots, key=lambda s: s.name)


def _saved_keys(slot: ParamSlot) -> tuple[str, ...]:
    """The optimizer tensors of ``slot`` a checkpoint holds."""
    return MOMENTS + ((MAIN,) if slot.model_param.dtype != torch.float32 else ())


def _local_value(slot: ParamSlot, key: str) -> Optional[torch.Tensor]:
    """This rank's tensor of ``key`` (flat range for a distributed optimizer), or None when
    the state does not exist yet (before the first step: zero moments)."""
    if slot.main is None:
        return None
    if key == MAIN:
        return slot.main.detach()
    return slot.state().get(key)


def _whole(slot: ParamSlot, key: str, owner: int) -> Optional[torch.Tensor]:
    """The tensor of ``key`` in the parameter's shape on the rank that writes it, None
    elsewhere. Distributed optimizer: a sum-reduce of the ranks' ranges onto ``owner``."""
    shape, value = slot.model_param.shape, _local_value(slot, key)
    if not slot.distributed:
        return (value if value is not None else torch.zeros(shape)).detach().reshape(shape).float().cpu()
    flat = torch.zeros(slot.model_param.numel(), dtype=torch.float32, device=slot.model_param.device)
    if value is not None:
        start, end = slot.flat_range
        flat[start:end] = value.detach().reshape(-1).float()
    dist.reduce(flat, dst=dist.get_global_rank(slot.group, owner), group=slot.group)
    return flat.view(shape).cpu() if slot.group.rank() == owner else None


def _prefixed(tm: TensorMap, key: str, prefix: str = OPTIMIZER_PREFIX) -> TensorMap:
    return dataclasses.replace(tm, mcore=f"{prefix}/{key}/{tm.mcore}" if key else f"{prefix}/{tm.mcore}")


def named_fragments(prefix: str, tensors: dict[str, torch.Tensor], stage_maps: dict[str, TensorMap],
                    spec: ShardSpec, ctx) -> tuple[dict[str, ShardedTensor], dict[str, torch.Tensor]]:
    """Fragments of parameter-shaped tensors (a trainer's, e.g. GRPO's reference weights),
    keyed ``<prefix>/<global name>`` and replicated over DP like the model; with the view
    behind each key, so that loading fills ``tensors`` in place."""
    state: dict[str, ShardedTensor] = {}
    views: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        if name not in stage_maps:
            raise KeyError(f"{prefix}: {name!r} is not a parameter of this pipeline stage")
        for dict_key, st, view in tensor_fragments(_prefixed(stage_maps[name], "", prefix), tensors[name], spec,
                                                   tp=ctx.tp, tp_rank=ctx.tp_rank, dp_rank=ctx.replica_rank):
            st.data = st.data.contiguous()
            state[dict_key], views[dict_key] = st, view
    return state, views


def optimizer_fragments(optimizer, model, stage_maps: dict[str, TensorMap], spec: ShardSpec, ctx
                        ) -> dict[str, ShardedTensor]:
    """This rank's fragments of the optimizer state (collective over each distributed
    optimizer's DP group: every rank must call it)."""
    state: dict[str, ShardedTensor] = {}
    for index, slot in enumerate(param_slots(optimizer, model)):
        owner = index % slot.group.size() if slot.distributed else 0
        replica = 0 if slot.distributed else ctx.replica_rank
        for key in _saved_keys(slot):
            whole = _whole(slot, key, owner)
            if whole is None:
                continue
            for dict_key, st, _ in tensor_fragments(_prefixed(stage_maps[slot.name], key), whole, spec, tp=ctx.tp,
                                                    tp_rank=ctx.tp_rank, dp_rank=replica):
                st.data = st.data.contiguous()
                state[dict_key] = st
    return state


def common_state(optimizer, device: torch.device) -> dict:
    """What every rank shares: Adam's step count (agreed over all ranks: a pipeline stage
    without trainable parameters has none) and the fp16 loss scalers."""
    inner = _inner_optimizers(optimizer)
    steps = [int(s["step"]) for opt in inner for s in opt.state.values() if "step" in s]
    steps += [int(g["step"]) for opt in inner for g in opt.param_groups if "step" in g]
    step = torch.tensor([max(steps, default=0)], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
    scalers = [opt.grad_scaler.state_dict() if getattr(opt, "grad_scaler", None) else None
               for opt in _sub_optimizers(optimizer)]
    return {"step": int(step.item()), "grad_scalers": scalers}


def _inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return [opt.optimizer for opt in _sub_optimizers(optimizer)
            if not getattr(opt, "is_stub_optimizer", False) and getattr(opt, "optimizer", None) is not None]


def optimizer_load_requests(optimizer, model, stage_maps: dict[str, TensorMap], spec: ShardSpec, ctx,
                            metadata: dict) -> tuple[dict[str, ShardedTensor], dict[str, torch.Tensor], list]:
    """Fragments to read for this rank's optimizer state: (state dict, the buffer behind
    each key, [(slot, key, whole buffer)] for :func:`apply_loaded`). A main copy is read when
    the checkpoint has one and this run keeps one (bf16/fp16 parameters); otherwise the main
    copy is the loaded model parameter (:func:`apply_loaded`)."""
    state: dict[str, ShardedTensor] = {}
    views: dict[str, torch.Tensor] = {}
    targets = []
    for slot in param_slots(optimizer, model):
        if slot.main is None and ctx.replica_rank != 0:
            continue  # a distributed optimizer's range on this rank misses the parameter
        # The main replica (replica rank 0) requests every parameter, also those outside its
        # range (read, then dropped): Megatron's loader wants each fragment's main replica.
        for key in _saved_keys(slot):
            tm = _prefixed(stage_maps[slot.name], key)
            if key == MAIN and tm.mcore not in metadata:
                continue  # saved from fp32 parameters: the model checkpoint holds the main copy
            if tm.mcore not in metadata:
                raise KeyError(f"no tensor {tm.mcore!r}: the checkpoint has no optimizer state for parameter "
                               f"{slot.name!r} (was it frozen in the run that saved it?)")
            whole = torch.zeros(slot.model_param.shape, dtype=torch.float32)
            for dict_key, st, view in tensor_fragments(tm, whole, spec, tp=ctx.tp, tp_rank=ctx.tp_rank,
                                                       dp_rank=ctx.replica_rank):
                state[dict_key], views[dict_key] = st, view
            if slot.main is not None:
                targets.append((slot, key, whole))
    return state, views, targets


def apply_loaded(optimizer, targets: list, common: dict) -> None:
    """Puts the loaded tensors into the optimizer (creating Adam's state where no step has
    run yet), then the step count and loss scalers of ``common``."""
    for opt in _sub_optimizers(optimizer):
        if not getattr(opt, "is_stub_optimizer", False) and hasattr(opt, "reload_model_params"):
            opt.reload_model_params()  # main copies from the loaded model; saved ones overwrite below
    step = int(common["step"])
    with torch.no_grad():
        for slot, key, whole in targets:
            value = whole.view(-1)[slot.flat_range[0]:slot.flat_range[1]] if slot.distributed else whole
            if key == MAIN:
                slot.main.copy_(value.view_as(slot.main))
                continue
            state = slot.inner.state[slot.main]
            if key not in state:
                state[key] = torch.zeros_like(slot.main)
            state[key].copy_(value.view_as(state[key]))
            if isinstance(slot.inner, (torch.optim.Adam, torch.optim.AdamW)):
                state["step"] = torch.tensor(float(step), dtype=torch.float32)
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" in group:  # Transformer Engine's / Apex's FusedAdam count steps per group
                group["step"] = step
    for opt, scaler in zip(_sub_optimizers(optimizer), common["grad_scalers"]):
        if scaler is not None and getattr(opt, "grad_scaler", None):
            opt.grad_scaler.load_state_dict(scaler)
