"""Model tensors in Megatron ``dist_checkpointing`` checkpoints, independent of TP and PP.

Every tensor is saved under its global Megatron name (layer indices over the whole
model, see :class:`~megatron_r1v.models.r1v.hf_mapping.TensorMap`) with the shape of
:func:`~megatron_r1v.models.r1v.hf_mapping.hf_to_stored`, and each rank contributes
the fragments it holds:

* replicated tensors: the whole tensor, main replica on TP rank 0 / DP rank 0;
* TP-split tensors (column, vocabulary, GQA qkv, row): one regular chunk along the
  split axis; the vocabulary padding is the same at every TP (see
  ``DecoderArch.padded_vocab_size``), so the global shape is too;
* SwiGLU fc1: chunk r of ``[2, F, h]`` along F is this rank's ``[gate_r; up_r]``, saved
  as two fragments (gate_r, up_r) so that no fragment is larger than an HF tensor;
* InternViT attention: one fragment per real head (dummy heads are skipped), because
  25 heads over 26/28/32 padded slots are not a regular chunking.

A checkpoint written at one (TP, PP) therefore loads at any other: Megatron's loader
reads whatever fragments the new layout asks for.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_r1v.checkpoint.torch_dist_io import StreamingSaveStrategy
from megatron_r1v.models.r1v.hf_mapping import ShardSpec, TensorMap

_VISION_HEAD_KINDS = {"vision_qkv": 0, "head_vec": 0, "head_row": 1}  # kind -> head axis of the stored shape


def _head_view(tm: TensorMap, local: torch.Tensor, d: int) -> torch.Tensor:
    if tm.kind == "vision_qkv":
        return local.view(-1, 3 * d, *local.shape[1:])
    if tm.kind == "head_vec":
        return local.view(-1, d)
    return local.view(local.shape[0], -1, d)  # head_row


def tensor_fragments(
    tm: TensorMap, local: torch.Tensor, spec: ShardSpec, *, tp: int, tp_rank: int, dp_rank: int
) -> list[tuple[str, ShardedTensor, torch.Tensor]]:
    """(state-dict key, ShardedTensor, view of ``local``) for this rank's pieces of ``tm``.

    ``local`` is this rank's Megatron tensor (a parameter, or ``hf_to_mcore_shard``'s
    output). The ShardedTensors wrap the views, so saving reads ``local`` directly.
    """
    key = tm.mcore
    if tm.kind == "replicated":
        return [(key, ShardedTensor.from_rank_offsets(key, local, replica_id=(0, tp_rank, dp_rank)), local)]
    replica = (0, 0, dp_rank)
    if tm.kind in _VISION_HEAD_KINDS:
        axis = _VISION_HEAD_KINDS[tm.kind]
        per_head = _head_view(tm, local, spec.vision_head_dim)
        heads_local = per_head.shape[axis]
        fragments = []
        for i in range(heads_local):
            head = tp_rank * heads_local + i
            if head >= spec.vision_heads:
                continue  # a dummy head: zero by construction, never stored
            view = per_head.narrow(axis, i, 1)
            st = ShardedTensor.from_rank_offsets(key, view, (axis, head, spec.vision_heads), replica_id=replica)
            fragments.append((f"{key}#head{head}", st, view))
        return fragments
    if tm.kind == "fc1":
        pair = local.view(2, local.shape[0] // 2, *local.shape[1:])
        fragments = []
        for i, part in enumerate(("gate", "up")):
            view = pair[i:i + 1]
            st = ShardedTensor.from_rank_offsets(key, view, (0, i, 2), (1, tp_rank, tp), replica_id=replica)
            fragments.append((f"{key}#{part}", st, view))
        return fragments
    axis = 1 if tm.kind == "row" else 0
    return [(key, ShardedTensor.from_rank_offsets(key, local, (axis, tp_rank, tp), replica_id=replica), local)]


def sharded_state_dict(
    named_tensors: Iterable[tuple[TensorMap, torch.Tensor]], spec: ShardSpec, *, tp: int, tp_rank: int, dp_rank: int
) -> tuple[dict[str, ShardedTensor], dict[str, torch.Tensor]]:
    """State dict of all fragments, plus the local view behind each state-dict key."""
    state: dict[str, ShardedTensor] = {}
    views: dict[str, torch.Tensor] = {}
    for tm, local in named_tensors:
        for dict_key, st, view in tensor_fragments(tm, local, spec, tp=tp, tp_rank=tp_rank, dp_rank=dp_rank):
            if not st.data.is_contiguous():
                st.data = st.data.contiguous()
            state[dict_key] = st
            views[dict_key] = view
    return state, views


def save_fragments(state: dict[str, ShardedTensor], directory: str) -> None:
    """Writes a torch_dist checkpoint (collective over the ranks that built ``state``)."""
    dist_checkpointing.save(state, directory, sharded_strategy=("torch_dist", 1))


def save_fragments_streaming(
    state: dict[str, ShardedTensor], produce: Callable[[ShardedTensor], torch.Tensor], directory: str
) -> None:
    """Like :func:`save_fragments` for fragments that only describe their data (meta
    tensors): ``produce`` makes each one's data when the writer reaches it, so a rank
    holds a few fragments instead of its shard (see ``torch_dist_io``). Same format,
    same collective."""
    dist_checkpointing.save(state, directory, sharded_strategy=StreamingSaveStrategy(produce))


def load_into(state: dict[str, ShardedTensor], views: dict[str, torch.Tensor], directory: str) -> dict:
    """Loads the fragments of ``state`` from ``directory`` and copies them into ``views``;
    returns what Megatron's loader returned (with the checkpoint's common, non-tensor part).

    Loading goes through fresh contiguous buffers in the checkpoint's dtype, so parameter
    views that are not contiguous (per-head columns) receive exactly what was saved, and a
    bf16 checkpoint loads into fp32 parameters (and vice versa) by a plain cast.
    """
    import dataclasses

    metadata = dist_checkpointing.load_tensors_metadata(directory)
    for dict_key, st in list(state.items()):
        if st.key not in metadata:
            raise KeyError(f"checkpoint {directory} has no tensor {st.key!r}")
        dtype = metadata[st.key].dtype
        state[dict_key] = dataclasses.replace(st, data=torch.empty(st.data.shape, dtype=dtype), dtype=dtype)
    loaded = dist_checkpointing.load(state, directory, sharded_strategy=("torch_dist", 1))
    with torch.no_grad():
        for dict_key, view in views.items():
            view.copy_(loaded[dict_key])
    return loaded


def model_fragments(
    model: torch.nn.Module, stage_maps: dict[str, TensorMap], spec: ShardSpec, *, tp: int, tp_rank: int, dp_rank: int
) -> tuple[dict[str, ShardedTensor], dict[str, torch.Tensor]]:
    """Fragments of this rank's model parameters (keys are global Megatron names)."""
    from megatron_r1v.checkpoint.weights import unwrap_model

    params = dict(unwrap_model(model).named_parameters())
    missing = sorted(set(stage_maps) - set(params))
    if missing:
        raise ValueError(f"model has no parameter {missing[0]!r} that the checkpoint layout expects")
    pairs = [(tm, params[name].data) for name, tm in stage_maps.items()]
    return sharded_state_dict(pairs, spec, tp=tp, tp_rank=tp_rank, dp_rank=dp_rank)


def load_model_checkpoint(model, stage_maps, spec, ctx, directory: str, *, verify: bool = True) -> None:
    """Fills this rank's parameters from a model checkpoint saved at any TP/PP; first checks
    its files against their manifest (collective; ``checkpoint/manifest.py``) unless the
    caller already has (``verify=False``)."""
    if verify:
        from megatron_r1v.checkpoint.manifest import verify as verify_manifest

        verify_manifest(directory)
    state, views = model_fragments(model, stage_maps, spec, tp=ctx.tp, tp_rank=ctx.tp_rank,
                                   dp_rank=ctx.replica_rank)
    load_into(state, views, directory)


def save_model_checkpoint(model, stage_maps, spec, ctx, directory: str) -> None:
    """Writes this rank's parameters (collective over all ranks)."""
    state, _ = model_fragments(model, stage_maps, spec, tp=ctx.tp, tp_rank=ctx.tp_rank, dp_rank=ctx.replica_rank)
    save_fragments(state, directory)
