"""The one place that knows Hugging Face names: HF <-> Megatron-Core tensors, both ways.

Every tensor of the Megatron model is described by a :class:`TensorMap`: its global
Megatron name (layer indices counted over the whole model, not per pipeline stage),
the HF tensors it is built from, and how it is split over tensor-parallel ranks.
The conversion tool, the parity tests and the rollout weight sync all go through
:func:`hf_to_mcore_shard` and :func:`mcore_shards_to_hf` (checkpoint conversion through
their streaming forms, :func:`stored_box_from_hf` and :func:`hf_from_stored`); nothing
else knows HF names.

Layouts that need more than a slice:

* ``linear_qkv`` (GQA): Megatron stores rows per query group, ``[q heads of group g;
  k_g; v_g]`` for g = 0..G-1, so a TP rank's contiguous slice holds whole groups.
* ``linear_fc1`` (SwiGLU): TP rank r holds ``[gate_r; up_r]``, the r-th slices of gate
  and up stacked, not the r-th slice of ``[gate; up]``.
* vocabulary (embedding, output layer): padded with zero rows to a multiple of
  ``divisible_by * tp``; padding is dropped again on the way out, never exported.
* InternViT attention (MHA): heads padded with zero "dummy" heads to a multiple of TP
  (25 -> 26/28/32); ``linear_qkv`` rows per head ``[q_h; k_h; v_h]``, q/k norm weights
  and ``linear_proj`` columns padded with zeros. Dummy entries are dropped on export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import torch

from megatron_r1v.models.r1v.presets import DecoderArch, R1VArch, VisionArch

SplitKind = Literal["replicated", "column", "row", "qkv", "fc1", "vocab", "vision_qkv", "head_vec", "head_row"]


@dataclass(frozen=True)
class HFDecoderNames:
    """Where the Qwen2 decoder sits inside an HF checkpoint."""

    prefix: str = "model."
    """Prefix of ``embed_tokens``/``layers``/``norm`` (``model.`` in Qwen2ForCausalLM)."""
    lm_head: str = "lm_head.weight"


QWEN2_CAUSAL_LM = HFDecoderNames()
# transformers' InternVLForConditionalGeneration and the released (InternVL-chat) layout.
INTERNVL_TRANSFORMERS = HFDecoderNames("model.language_model.", "lm_head.weight")
INTERNVL_CHAT = HFDecoderNames("language_model.model.", "language_model.lm_head.weight")


@dataclass(frozen=True)
class HFLayout:
    """Names of a whole model in one HF layout."""

    decoder: HFDecoderNames
    vision_prefix: str = ""
    """Prefix of the vision tower (empty for decoder-only checkpoints)."""
    projector_prefix: str = ""
    style: Literal["transformers", "skywork"] = "transformers"
    """Vision/adapter naming: transformers' InternVL, or the released InternVL-chat
    (``attn.qkv`` fused as rows [Q; K; V], ``norm1``/``ls1``, ``mlp1.{0,1,3}``)."""


QWEN2_LAYOUT = HFLayout(QWEN2_CAUSAL_LM)
# InternVLForConditionalGeneration's in-memory state_dict() names (a live HF model).
TRANSFORMERS_LAYOUT = HFLayout(INTERNVL_TRANSFORMERS, "model.vision_tower.", "model.multi_modal_projector.")
# The names transformers' save_pretrained writes to disk for the same model (hub format).
TRANSFORMERS_FILE_LAYOUT = HFLayout(INTERNVL_CHAT, "vision_tower.", "multi_modal_projector.")
# The released Skywork-R1V2 / InternVL-chat checkpoints.
SKYWORK_LAYOUT = HFLayout(INTERNVL_CHAT, "vision_model.", "mlp1.", style="skywork")


@dataclass(frozen=True)
class TensorMap:
    mcore: str
    """Global Megatron name (layer index over the whole model)."""
    hf: tuple[str, ...]
    kind: SplitKind
    layer: Optional[int] = None
    """Global decoder layer index; None for embedding, final norm and output layer."""
    placement: Literal["first", "last", "layer"] = "layer"
    """Pipeline stage holding it: first (embedding), last (final norm, head), or by layer."""


def decoder_tensor_maps(
    arch: DecoderArch,
    names: HFDecoderNames = QWEN2_CAUSAL_LM,
    *,
    backend: str = "local",
    mcore_prefix: str = "",
) -> list[TensorMap]:
    """All tensors of a Qwen2 decoder, in model order."""
    if not arch.untie_embeddings:
        raise ValueError("tied input/output embeddings are not supported (Qwen2 >= 7B and QwQ are untied)")
    p, m = names.prefix, mcore_prefix
    # TE fuses the norms into the next linear layer, which renames their weights.
    ln_attn = "self_attention.linear_qkv.layer_norm_weight" if backend == "te" else "input_layernorm.weight"
    ln_mlp = "mlp.linear_fc1.layer_norm_weight" if backend == "te" else "pre_mlp_layernorm.weight"
    maps = [TensorMap(f"{m}embedding.word_embeddings.weight", (f"{p}embed_tokens.weight",), "vocab", None, "first")]
    for i in range(arch.num_layers):
        ml, hl = f"{m}decoder.layers.{i}.", f"{p}layers.{i}."
        attn = f"{hl}self_attn."
        maps += [
            TensorMap(ml + ln_attn, (hl + "input_layernorm.weight",), "replicated", i),
            TensorMap(
                ml + "self_attention.linear_qkv.weight",
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), "qkv", i,
            ),
            TensorMap(
                ml + "self_attention.linear_qkv.bias",
                (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"), "qkv", i,
            ),
            TensorMap(ml + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "row", i),
            TensorMap(ml + ln_mlp, (hl + "post_attention_layernorm.weight",), "replicated", i),
            TensorMap(
                ml + "mlp.linear_fc1.weight", (hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"), "fc1", i
            ),
            TensorMap(ml + "mlp.linear_fc2.weight", (hl + "mlp.down_proj.weight",), "row", i),
        ]
    maps += [
        TensorMap(f"{m}decoder.final_layernorm.weight", (f"{p}norm.weight",), "replicated", None, "last"),
        TensorMap(f"{m}output_layer.weight", (names.lm_head,), "vocab", None, "last"),
    ]
    return maps


def stage_tensor_maps(
    maps: list[TensorMap], num_layers: int, pp_rank: int, pp: int, *, mcore_prefix: str = ""
) -> dict[str, TensorMap]:
    """The maps held by pipeline stage ``pp_rank``, keyed by the stage-local Megatron name."""
    if num_layers % pp:
        raise ValueError(f"pp={pp} must divide num_layers={num_layers}")
    per_stage = num_layers // pp
    first, last = pp_rank == 0, pp_rank == pp - 1
    local: dict[str, TensorMap] = {}
    for tm in maps:
        if tm.placement == "first" and first or tm.placement == "last" and last:
            local[tm.mcore] = tm
        elif tm.placement == "layer" and tm.layer is not None and tm.layer // per_stage == pp_rank:
            global_part = f"{mcore_prefix}decoder.layers.{tm.layer}."
            local_part = f"{mcore_prefix}decoder.layers.{tm.layer - pp_rank * per_stage}."
            local[tm.mcore.replace(global_part, local_part, 1)] = tm
    return local


@dataclass(frozen=True)
class ShardSpec:
    """Shape facts the split/merge rules need."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    vision_heads: int = 0
    vision_heads_padded: int = 0
    """Vision heads including dummy heads (a multiple of TP)."""
    vision_head_dim: int = 0

    @classmethod
    def for_decoder(cls, arch: DecoderArch, padded_vocab_size: int) -> "ShardSpec":
        return cls(arch.num_attention_heads, arch.num_query_groups, arch.head_dim, arch.vocab_size, padded_vocab_size)

    @classmethod
    def for_model(cls, arch: R1VArch, tp: int, divisible_by: int = 128, reshard_tp: int = 8) -> "ShardSpec":
        dec = arch.decoder
        base = cls.for_decoder(dec, dec.padded_vocab_size(tp, divisible_by, reshard_tp))
        if arch.vision is None:
            return base
        heads = arch.vision.num_attention_heads
        return cls(
            base.num_attention_heads, base.num_query_groups, base.head_dim, base.vocab_size, base.padded_vocab_size,
            vision_heads=heads, vision_heads_padded=-(-heads // tp) * tp, vision_head_dim=arch.vision.head_dim,
        )


def _check_shape(name: str, tensor: torch.Tensor, rows: int) -> None:
    if tensor.shape[0] != rows:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {rows} rows")


def hf_to_mcore_full(tm: TensorMap, hf: dict[str, torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """The unsharded Megatron tensor (qkv interleaved, vocab padded) from HF tensors.

    fc1 is returned as ``[gate; up]``; its TP sharding is not a slice of this (see
    :func:`hf_to_mcore_shard`).
    """
    if tm.kind == "vision_qkv":
        return _pad_vision_heads(tm, _vision_qkv_parts(tm, hf, spec), spec)
    tensors = [hf[n] for n in tm.hf]
    if tm.kind in ("replicated", "row", "column"):
        return tensors[0]
    if tm.kind in ("head_vec", "head_row"):
        return _pad_vision_heads(tm, tensors, spec)
    if tm.kind == "vocab":
        (table,) = tensors
        _check_shape(tm.hf[0], table, spec.vocab_size)
        pad = spec.padded_vocab_size - spec.vocab_size
        return torch.cat([table, table.new_zeros((pad, *table.shape[1:]))]) if pad else table
    if tm.kind == "qkv":
        q, k, v = tensors
        g, d = spec.num_query_groups, spec.head_dim
        per_group = spec.num_attention_heads // g
        _check_shape(tm.hf[0], q, spec.num_attention_heads * d)
        _check_shape(tm.hf[1], k, g * d)
        _check_shape(tm.hf[2], v, g * d)
        trailing = q.shape[1:]
        grouped = torch.cat(
            [q.reshape(g, per_group * d, *trailing), k.reshape(g, d, *trailing), v.reshape(g, d, *trailing)], dim=1
        )
        return grouped.reshape(g * (per_group + 2) * d, *trailing)
    if tm.kind == "fc1":
        gate, up = tensors
        if gate.shape != up.shape:
            raise ValueError(f"{tm.hf[0]} {tuple(gate.shape)} and {tm.hf[1]} {tuple(up.shape)} differ in shape")
        return torch.cat([gate, up])
    raise AssertionError(tm.kind)


def hf_to_mcore_shard(
    tm: TensorMap, hf: dict[str, torch.Tensor], spec: ShardSpec, tp: int, tp_rank: int
) -> torch.Tensor:
    """This TP rank's Megatron tensor, built from the HF tensors named by ``tm.hf``."""
    if tm.kind == "fc1":
        gate, up = (hf[n] for n in tm.hf)
        if gate.shape[0] % tp:
            raise ValueError(f"tp={tp} does not divide {tm.hf[0]} rows {gate.shape[0]}")
        return torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]]).contiguous()
    full = hf_to_mcore_full(tm, hf, spec)
    if tm.kind == "replicated" or tp == 1:
        return full.contiguous()
    dim = 1 if tm.kind in ("row", "head_row") else 0
    if full.shape[dim] % tp:
        raise ValueError(f"tp={tp} does not divide dim {dim} of {tm.mcore} {tuple(full.shape)}")
    return full.chunk(tp, dim=dim)[tp_rank].contiguous()


def mcore_shards_to_hf(tm: TensorMap, shards: list[torch.Tensor], spec: ShardSpec) -> dict[str, torch.Tensor]:
    """HF tensors from the TP shards of one Megatron tensor (ordered by TP rank)."""
    if tm.kind == "replicated":
        return {tm.hf[0]: shards[0]}
    if tm.kind == "row":
        return {tm.hf[0]: torch.cat(shards, dim=1)}
    if tm.kind == "column":
        return {tm.hf[0]: torch.cat(shards)}
    if tm.kind in ("vision_qkv", "head_vec", "head_row"):
        return _unpad_vision_heads(tm, shards, spec)
    if tm.kind == "fc1":
        halves = [s.chunk(2) for s in shards]
        return {tm.hf[0]: torch.cat([h[0] for h in halves]), tm.hf[1]: torch.cat([h[1] for h in halves])}
    full = torch.cat(shards)
    if tm.kind == "vocab":
        _check_shape(tm.mcore, full, spec.padded_vocab_size)
        return {tm.hf[0]: full[: spec.vocab_size]}
    if tm.kind == "qkv":
        g, d = spec.num_query_groups, spec.head_dim
        per_group = spec.num_attention_heads // g
        trailing = full.shape[1:]
        grouped = full.reshape(g, (per_group + 2) * d, *trailing)
        q, k, v = grouped.split([per_group * d, d, d], dim=1)
        return {
            tm.hf[0]: q.reshape(g * per_group * d, *trailing),
            tm.hf[1]: k.reshape(g * d, *trailing),
            tm.hf[2]: v.reshape(g * d, *trailing),
        }
    raise AssertionError(tm.kind)


def _vision_qkv_parts(tm: TensorMap, hf: dict[str, torch.Tensor], spec: ShardSpec) -> list[torch.Tensor]:
    """[q, k, v] of an InternViT attention, from separate tensors or one fused [Q; K; V]."""
    if len(tm.hf) == 3:
        return [hf[n] for n in tm.hf]
    (fused,) = (hf[n] for n in tm.hf)
    _check_shape(tm.hf[0], fused, 3 * spec.vision_heads * spec.vision_head_dim)
    return list(fused.chunk(3))


def _vision_qkv_out(tm: TensorMap, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    if len(tm.hf) == 3:
        return dict(zip(tm.hf, (q, k, v)))
    return {tm.hf[0]: torch.cat([q, k, v])}


def hf_to_stored(tm: TensorMap, hf: dict[str, torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """The tensor as dist checkpoints keep it: one shape for every TP/PP.

    Most kinds store the unsharded Megatron tensor; SwiGLU fc1 stores ``[2, F, h]``
    (gate, up) so that a TP rank's ``[gate_r; up_r]`` is one regular chunk; InternViT
    attention stores real heads only, head-major (``[heads, 3d, h]``, ``[heads, d]``,
    ``[h, heads, d]``), so dummy heads never reach a checkpoint.
    """
    tensors = _vision_qkv_parts(tm, hf, spec) if tm.kind == "vision_qkv" else [hf[n] for n in tm.hf]
    heads, d = spec.vision_heads, spec.vision_head_dim
    if tm.kind == "fc1":
        gate, up = tensors
        if gate.shape != up.shape:
            raise ValueError(f"{tm.hf[0]} {tuple(gate.shape)} and {tm.hf[1]} {tuple(up.shape)} differ in shape")
        return torch.stack([gate, up])
    if tm.kind in ("vision_qkv", "head_vec", "head_row"):
        for name, t in zip(tm.hf * 3, tensors):
            width = t.shape[1] if tm.kind == "head_row" else t.shape[0]
            if width != heads * d:
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}; expected {heads * d} per-head rows")
        if tm.kind == "head_vec":
            return tensors[0].reshape(heads, d)
        if tm.kind == "head_row":
            return tensors[0].reshape(tensors[0].shape[0], heads, d)
        trailing = tensors[0].shape[1:]
        return torch.stack([t.reshape(heads, d, *trailing) for t in tensors], dim=1).reshape(heads, 3 * d, *trailing)
    return hf_to_mcore_full(tm, hf, spec)


def stored_to_hf(tm: TensorMap, stored: torch.Tensor, spec: ShardSpec) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_stored`."""
    heads, d = spec.vision_heads, spec.vision_head_dim
    if tm.kind in ("replicated", "column", "row"):
        return {tm.hf[0]: stored}  # kept as HF has it (a one-shard torch.cat would copy it)
    if tm.kind == "fc1":
        return {tm.hf[0]: stored[0], tm.hf[1]: stored[1]}
    if tm.kind == "head_vec":
        return {tm.hf[0]: stored.reshape(heads * d)}
    if tm.kind == "head_row":
        return {tm.hf[0]: stored.reshape(stored.shape[0], heads * d)}
    if tm.kind == "vision_qkv":
        trailing = stored.shape[2:]
        per_head = stored.reshape(heads, 3, d, *trailing)
        return _vision_qkv_out(tm, *(per_head[:, i].reshape(heads * d, *trailing) for i in range(3)))
    return mcore_shards_to_hf(tm, [stored], spec)


# --- streaming: one box of a stored tensor at a time ------------------------------------
# Conversion of a large checkpoint must not hold whole tensors it does not need: import
# writes each checkpoint fragment from just the HF rows (or columns) inside it, and export
# reads a stored tensor in pieces no larger than the HF tensors they become.

HFSliceReader = Callable[[str, tuple[slice, ...], torch.Tensor], Any]
"""``(HF name, index of its leading dims, out)``: fills ``out`` with that part of the tensor."""
StoredBoxReader = Callable[[tuple[slice, ...]], torch.Tensor]
"""``index of the stored tensor's leading dims`` -> a new tensor holding that box."""


def _stored_row_runs(tm: TensorMap, spec: ShardSpec) -> list[tuple[int, str, int, int]]:
    """(first stored row, HF name, first HF row, rows) for kinds whose stored rows are HF
    rows reordered: ``qkv`` per query group, ``vision_qkv`` per head (rows of ``[heads * 3d]``)."""
    runs, row = [], 0
    if tm.kind == "qkv":
        g, d = spec.num_query_groups, spec.head_dim
        q_rows = spec.num_attention_heads // g * d
        for group in range(g):
            for name, start, n in ((tm.hf[0], group * q_rows, q_rows), (tm.hf[1], group * d, d),
                                   (tm.hf[2], group * d, d)):
                runs.append((row, name, start, n))
                row += n
        return runs
    assert tm.kind == "vision_qkv", tm.kind
    heads, d = spec.vision_heads, spec.vision_head_dim
    for head in range(heads):
        for part in range(3):  # q, k, v: separate tensors or one fused [Q; K; V]
            name, start = (tm.hf[part], head * d) if len(tm.hf) == 3 else (tm.hf[0], (part * heads + head) * d)
            runs.append((row, name, start, d))
            row += d
    return runs


def stored_box_from_hf(
    tm: TensorMap, read: HFSliceReader, spec: ShardSpec, offsets: Sequence[int], sizes: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``hf_to_stored(tm, hf, spec)[box]`` in ``dtype`` for the box ``[offsets, offsets + sizes)``.

    Only the HF rows (and columns) inside the box are read, each straight into its place
    in the result, so producing a checkpoint fragment costs the fragment. Boxes are those
    of checkpoint fragments: any rows/columns of the plain kinds, whole heads of the
    InternViT head kinds.
    """
    box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
    out = torch.empty(tuple(sizes), dtype=dtype)
    kind = tm.kind
    d = spec.vision_head_dim
    if kind in ("replicated", "column", "row"):
        read(tm.hf[0], box, out)
    elif kind == "head_vec":  # stored [heads, d]
        assert box[1] == slice(0, d), "fragments hold whole heads"
        read(tm.hf[0], (slice(box[0].start * d, box[0].stop * d),), out.view(-1))
    elif kind == "head_row":  # stored [h, heads, d]
        assert box[2] == slice(0, d), "fragments hold whole heads"
        read(tm.hf[0], (box[0], slice(box[1].start * d, box[1].stop * d)), out.view(out.shape[0], -1))
    elif kind == "vocab":  # rows past the real vocabulary are zero padding
        rows = box[0]
        real = max(0, min(rows.stop, spec.vocab_size) - rows.start)
        if real:
            read(tm.hf[0], (slice(rows.start, rows.start + real), *box[1:]), out[:real])
        out[real:].zero_()
    elif kind == "fc1":  # stored [2, F, h]: gate, up
        for i, which in enumerate(range(box[0].start, box[0].stop)):
            read(tm.hf[which], box[1:], out[i])
    else:  # qkv [rows, ...] or vision_qkv [heads, 3d, ...] (as rows of [heads * 3d, ...])
        if kind == "vision_qkv":
            assert box[1] == slice(0, 3 * d), "fragments hold whole heads"
            first, last, rest = box[0].start * 3 * d, box[0].stop * 3 * d, box[2:]
            flat = out.view(last - first, *out.shape[2:])
        else:
            first, last, rest, flat = box[0].start, box[0].stop, box[1:], out
        for row, name, start, n in _stored_row_runs(tm, spec):
            lo, hi = max(row, first), min(row + n, last)
            if lo < hi:
                read(name, (slice(start + lo - row, start + hi - row), *rest), flat[lo - first:hi - first])
    return out


def hf_from_stored(tm: TensorMap, read: StoredBoxReader, spec: ShardSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of ``tm`` in ``tm.hf`` order, as :func:`stored_to_hf` gives them, but
    read in pieces no larger than the tensors they become: fc1's gate and up one at a
    time, a vocabulary without its padding rows. Holds nothing between pieces."""
    if tm.kind == "fc1":
        for i, name in enumerate(tm.hf):
            yield name, read((slice(i, i + 1),))[0]
        return
    if tm.kind == "vocab":
        yield tm.hf[0], read((slice(0, spec.vocab_size),))
        return
    yield from stored_to_hf(tm, read(()), spec).items()


def stored_shape(tm: TensorMap, hf_shapes: dict[str, tuple[int, ...]], spec: ShardSpec) -> tuple[int, ...]:
    """Shape of :func:`hf_to_stored`'s result for HF tensors of these shapes (nothing is read)."""
    meta = {n: torch.empty(hf_shapes[n], device="meta") for n in tm.hf}
    return tuple(hf_to_stored(tm, meta, spec).shape)


def _pad_vision_heads(tm: TensorMap, tensors: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    heads, padded, d = spec.vision_heads, spec.vision_heads_padded, spec.vision_head_dim
    width, pad = heads * d, (padded - heads) * d
    if tm.kind == "head_row":
        (proj,) = tensors
        if proj.shape[1] != width:
            raise ValueError(f"tensor {tm.hf[0]!r} has shape {tuple(proj.shape)}; expected {width} columns")
        return torch.cat([proj, proj.new_zeros(proj.shape[0], pad)], dim=1)
    for name, t in zip(tm.hf * 3, tensors):
        _check_shape(name, t, width)
    padded_rows = [torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) for t in tensors]
    if tm.kind == "head_vec":
        return padded_rows[0]
    # MHA: Megatron's per-group interleave with one head per group.
    trailing = tensors[0].shape[1:]
    per_head = torch.stack([t.reshape(padded, d, *trailing) for t in padded_rows], dim=1)
    return per_head.reshape(padded * 3 * d, *trailing)


def _unpad_vision_heads(tm: TensorMap, shards: list[torch.Tensor], spec: ShardSpec) -> dict[str, torch.Tensor]:
    heads, padded, d = spec.vision_heads, spec.vision_heads_padded, spec.vision_head_dim
    if tm.kind == "head_row":
        return {tm.hf[0]: torch.cat(shards, dim=1)[:, : heads * d]}
    full = torch.cat(shards)
    if tm.kind == "head_vec":
        return {tm.hf[0]: full[: heads * d]}
    trailing = full.shape[1:]
    per_head = full.reshape(padded, 3, d, *trailing)[:heads]
    return _vision_qkv_out(tm, *(per_head[:, i].reshape(heads * d, *trailing) for i in range(3)))


# InternViT tensors: (Megatron name, transformers name(s), skywork name(s), split kind).
# Embeddings sit under "<vision prefix>embeddings."; layer tensors under "encoder.layer.N."
# (transformers) or "encoder.layers.N." (skywork). Skywork fuses q/k/v into one [Q; K; V].
_VISION_EMBEDDINGS: list[tuple[str, str, str]] = [
    ("class_token", "cls_token", "class_embedding"),
    ("position_embeddings", "position_embeddings", "position_embedding"),
    ("patch_embed.weight", "patch_embeddings.projection.weight", "patch_embedding.weight"),
    ("patch_embed.bias", "patch_embeddings.projection.bias", "patch_embedding.bias"),
]
_VISION_LAYER: list[tuple[str, tuple[str, ...], tuple[str, ...], SplitKind]] = [
    ("input_layernorm.weight", ("layernorm_before.weight",), ("norm1.weight",), "replicated"),
    ("self_attention.linear_qkv.weight",
     ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"), ("attn.qkv.weight",),
     "vision_qkv"),
    ("self_attention.q_layernorm.weight", ("attention.q_norm.weight",), ("attn.q_norm.weight",), "head_vec"),
    ("self_attention.k_layernorm.weight", ("attention.k_norm.weight",), ("attn.k_norm.weight",), "head_vec"),
    ("self_attention.linear_proj.weight", ("attention.projection_layer.weight",), ("attn.proj.weight",), "head_row"),
    ("self_attention.linear_proj.bias", ("attention.projection_layer.bias",), ("attn.proj.bias",), "replicated"),
    ("self_attn_bda.weight", ("lambda_1",), ("ls1",), "replicated"),
    ("pre_mlp_layernorm.weight", ("layernorm_after.weight",), ("norm2.weight",), "replicated"),
    ("mlp.linear_fc1.weight", ("mlp.fc1.weight",), ("mlp.fc1.weight",), "column"),
    ("mlp.linear_fc1.bias", ("mlp.fc1.bias",), ("mlp.fc1.bias",), "column"),
    ("mlp.linear_fc2.weight", ("mlp.fc2.weight",), ("mlp.fc2.weight",), "row"),
    ("mlp.linear_fc2.bias", ("mlp.fc2.bias",), ("mlp.fc2.bias",), "replicated"),
    ("mlp_bda.weight", ("lambda_2",), ("ls2",), "replicated"),
]


def vision_tensor_maps(vision: VisionArch, layout: HFLayout, *, mcore_prefix: str = "vision.") -> list[TensorMap]:
    """InternViT tensors (first pipeline stage) in the layout's naming."""
    p, m = layout.vision_prefix, mcore_prefix
    skywork = layout.style == "skywork"
    maps = [
        TensorMap(m + mcore, (f"{p}embeddings.{sky if skywork else tr}",), "replicated", None, "first")
        for mcore, tr, sky in _VISION_EMBEDDINGS
    ]
    for i in range(vision.num_layers):
        hl = f"{p}encoder.layers.{i}." if skywork else f"{p}encoder.layer.{i}."
        for mcore, tr, sky, kind in _VISION_LAYER:
            names = tuple(hl + n for n in (sky if skywork else tr))
            maps.append(TensorMap(f"{m}encoder.layers.{i}.{mcore}", names, kind, None, "first"))
    return maps


def adapter_tensor_maps(layout: HFLayout, *, mcore_prefix: str = "adapter.") -> list[TensorMap]:
    """The mlp1 adapter (first pipeline stage)."""
    p, m = layout.projector_prefix, mcore_prefix
    names = (("0", "1", "3") if layout.style == "skywork" else ("layer_norm", "linear_1", "linear_2"))
    norm, fc1, fc2 = names
    rows: list[tuple[str, str, SplitKind]] = [
        ("layer_norm.weight", f"{norm}.weight", "replicated"),
        ("layer_norm.bias", f"{norm}.bias", "replicated"),
        ("mlp.linear_fc1.weight", f"{fc1}.weight", "column"),
        ("mlp.linear_fc1.bias", f"{fc1}.bias", "column"),
        ("mlp.linear_fc2.weight", f"{fc2}.weight", "row"),
        ("mlp.linear_fc2.bias", f"{fc2}.bias", "replicated"),
    ]
    return [TensorMap(m + mc, (p + hf,), kind, None, "first") for mc, hf, kind in rows]


def model_tensor_maps(arch: R1VArch, layout: HFLayout, *, backend: str = "local") -> list[TensorMap]:
    """Every tensor of an :class:`R1VModel` (names under ``vision.``, ``adapter.``, ``language_model.``)."""
    maps = []
    if arch.vision is not None:
        if not layout.vision_prefix:
            raise ValueError("this HF layout has no vision tower names; use a multimodal layout")
        maps += vision_tensor_maps(arch.vision, layout) + adapter_tensor_maps(layout)
    return maps + decoder_tensor_maps(arch.decoder, layout.decoder, backend=backend, mcore_prefix="language_model.")
