"""Context parallelism (``parallel.cp``) over packed varlen rows, the way Transformer Engine's
THD context-parallel attention expects them.

A packed row ``[1, L]`` holds segments (samples, and a trailing padding segment) bounded by
``cu_seqlens``. With ``cp`` CP ranks each segment is padded at its end to a multiple of
``2 * cp`` (the *padded layout*, bounds ``cu_seqlens_padded``) and cut into ``2 * cp`` equal
chunks; CP rank ``r`` keeps chunks ``r`` and ``2 * cp - 1 - r`` of every segment, in row
order. Under causal attention chunk ``c`` attends to ``c + 1`` chunks' worth of keys, so every
rank does ``(r + 1) + (2 * cp - r)`` = ``2 * cp + 1`` chunk-units of work: balanced. This is
the order of TE's ``thd_get_partitioned_indices`` (transformer_engine/common/fused_attn/
context_parallel.cu: the local token's half picks chunk ``rank`` or ``2 * world_size - 1 -
rank``; it asserts every padded length is a multiple of ``2 * world_size``), and of the RoPE
slices Megatron-Core takes for THD with CP (``rope_utils._get_thd_freqs_on_this_cp_rank``).
TE's attention wants the *global* bounds: ``cu_seqlens_q`` the real lengths and
``cu_seqlens_q_padded`` the padded layout (it divides the padded one by ``cp`` itself:
``get_cu_seqlens_on_cp_rank`` in transformer_engine/pytorch/attention/dot_product_attention/
context_parallel.py), ``max_seqlen`` the longest padded segment.

On one rank the local tokens of a segment are contiguous (``2 * chunk`` of them), so the
local row's segment bounds are ``cu_seqlens_padded // cp``: per-sample sums over local tokens
work as before and are then summed over the CP group (:func:`sum_over_cp`).

The split happens after the image features are scattered into the decoder's input
embeddings (``R1VModel`` embeds the whole padded row, then keeps :func:`rank_indices`), so
the vision tower sees whole images and position ids stay those of the whole row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_r1v.data.template import IGNORE_INDEX

# Batch keys the split adds; a batch holding CP_INDEX is already split.
CP_INDEX = "cp_index"
CP_CU_SEQLENS = "cp_cu_seqlens"
CP_CU_SEQLENS_PADDED = "cp_cu_seqlens_padded"
# Model inputs kept whole (in the padded layout): the first stage embeds the whole row so that
# image features land where their tokens are, then keeps this rank's positions.
WHOLE_ROW_KEYS = ("tokens", "position_ids")
# Padding value of a per-token field in the padded layout (0 for every other field: token id 0,
# position 0, loss mask 0, advantage 0, weight 0, log-prob 0).
FILL = {"labels": IGNORE_INDEX}


def cp_token_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What every segment's padded length is a multiple of: ``2 * cp`` (TE's THD split), times
    ``tp`` under sequence parallelism, which further splits each rank's tokens over TP."""
    if cp < 1 or tp < 1:
        raise ValueError(f"cp and tp must be >= 1, got cp={cp}, tp={tp}")
    return 2 * cp * (tp if sequence_parallel else 1)


def packing_multiple(cp: int, tp: int, sequence_parallel: bool) -> int:
    """The packers' ``seq_multiple`` for a run: 1 without context parallelism (no padding)."""
    return 1 if cp == 1 else cp_token_multiple(cp, tp, sequence_parallel)


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


@dataclass(frozen=True)
class CPLayout:
    """A packed row's padded layout for ``cp`` ranks (module docstring)."""

    cp: int
    multiple: int
    cu_seqlens: torch.Tensor
    """[n + 1] int32: the segments' real lengths, global (TE's ``cu_seqlens_q``)."""
    cu_seqlens_padded: torch.Tensor
    """[n + 1] int32: every segment padded to ``multiple`` (TE's ``cu_seqlens_q_padded``)."""
    row_to_padded: torch.Tensor
    """[L] int64: where each token of the original row sits in the padded layout."""

    @property
    def row_length(self) -> int:
        return int(self.row_to_padded.numel())

    @property
    def padded_length(self) -> int:
        return int(self.cu_seqlens_padded[-1])

    @property
    def local_length(self) -> int:
        return self.padded_length // self.cp

    @property
    def max_seqlen_padded(self) -> int:
        return int((self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).max())

    def local_cu_seqlens(self) -> torch.Tensor:
        """[n + 1] int32: segment bounds of one rank's local row (the same on every rank)."""
        return (self.cu_seqlens_padded // self.cp).to(torch.int32)


def plan_layout(cu_seqlens: torch.Tensor, cp: int, multiple: Optional[int] = None,
                min_padded_length: int = 0) -> CPLayout:
    """The padded layout of a row with segment bounds ``cu_seqlens`` (``multiple``: default
    ``2 * cp``). ``min_padded_length``: a longer layout gets one more padding segment up to it
    (pipeline stages exchange one activation shape, so every row of a step must agree)."""
    multiple = 2 * cp if multiple is None else multiple
    if cp < 1 or multiple % (2 * cp):
        raise ValueError(f"the padding multiple {multiple} must be a multiple of 2 * cp = {2 * cp}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} must start at 0 and not decrease")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    padded = [padded_length(n, multiple) for n in lengths]
    extra = min_padded_length - sum(padded)
    if extra > 0:
        if extra % multiple:
            raise ValueError(f"min_padded_length {min_padded_length} is not a multiple of {multiple}")
        lengths.append(extra)  # a padding segment of its own: real tokens as far as TE knows
        padded.append(extra)
    starts = [0]
    for n in padded:
        starts.append(starts[-1] + n)
    row_to_padded = torch.cat([torch.arange(n, dtype=torch.long) + s for n, s in zip(lengths, starts)]
                              + [torch.zeros(0, dtype=torch.long)])[:bounds[-1]]
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return CPLayout(cp, multiple, cu, torch.tensor(starts, dtype=torch.int32), row_to_padded)


def rank_indices(cu_seqlens_padded: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """[L_padded / cp] int64: the padded-layout positions CP rank ``rank`` keeps, in its local
    order (per segment: chunk ``rank``, then chunk ``2 * cp - 1 - rank``)."""
    if not 0 <= rank < cp:
        raise ValueError(f"CP rank {rank} outside [0, {cp})")
    bounds = [int(b) for b in cu_seqlens_padded.tolist()]
    parts = []
    for start, end in zip(bounds, bounds[1:]):
        if (end - start) % (2 * cp):
            raise ValueError(f"padded segment [{start}, {end}) is not a multiple of 2 * cp = {2 * cp}")
        chunk = (end - start) // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk, dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def to_padded(x: torch.Tensor, layout: CPLayout, fill: float = 0) -> torch.Tensor:
    """A per-token tensor ``[L, ...]`` of the original row in the padded layout ``[L_padded, ...]``."""
    if x.shape[0] != layout.row_length:
        raise ValueError(f"per-token tensor of {x.shape[0]} positions for a row of {layout.row_length}")
    out = x.new_full((layout.padded_length, *x.shape[1:]), fill)
    out[layout.row_to_padded.to(x.device)] = x
    return out


def local_part(x: torch.Tensor, layout: CPLayout, rank: int, fill: float = 0) -> torch.Tensor:
    """This rank's ``[L_padded / cp, ...]`` of a per-token tensor ``[L, ...]`` of the original row."""
    index = rank_indices(layout.cu_seqlens_padded, layout.cp, rank).to(x.device)
    return to_padded(x, layout, fill).index_select(0, index)


def restore_row(parts: Sequence[torch.Tensor], layout: CPLayout) -> torch.Tensor:
    """The inverse of :func:`local_part`: every rank's local tensor (in CP rank order) back to
    the original row ``[L, ...]`` (the padding is dropped)."""
    if len(parts) != layout.cp:
        raise ValueError(f"{len(parts)} parts for {layout.cp} CP ranks")
    first = parts[0]
    padded = first.new_zeros((layout.padded_length, *first.shape[1:]))
    for rank, part in enumerate(parts):
        padded[rank_indices(layout.cu_seqlens_padded, layout.cp, rank).to(part.device)] = part
    return padded.index_select(0, layout.row_to_padded.to(padded.device))


def split_microbatch(batch: dict, cp: int, rank: int, multiple: Optional[int] = None,
                     min_padded_length: int = 0) -> tuple[dict, CPLayout]:
    """CP rank ``rank``'s micro-batch dict of a packed row's dict (``trainer.schedule``).

    Every ``[1, L]`` tensor is per-token: ``tokens`` and ``position_ids`` become the whole
    padded row (model inputs, see :data:`WHOLE_ROW_KEYS`), the others (labels, loss mask,
    log-probs, advantages, weights, ...) this rank's ``[1, L_padded / cp]``. ``cu_seqlens``
    becomes the local row's bounds; the global ones and this rank's positions are added under
    :data:`CP_CU_SEQLENS`, :data:`CP_CU_SEQLENS_PADDED` and :data:`CP_INDEX`. Other entries
    (images, per-sample vectors) are kept as they are.
    """
    if "cu_seqlens" not in batch:
        raise ValueError("context parallelism splits packed rows: the micro-batch has no cu_seqlens")
    length = batch["tokens"].shape[1]
    if batch["tokens"].shape[0] != 1:
        raise ValueError(f"context parallelism splits one packed row [1, L], got {tuple(batch['tokens'].shape)}")
    layout = plan_layout(batch["cu_seqlens"], cp, multiple, min_padded_length)
    index = rank_indices(layout.cu_seqlens_padded, cp, rank)
    out: dict = {}
    for key, value in batch.items():
        per_token = torch.is_tensor(value) and value.dim() == 2 and tuple(value.shape) == (1, length)
        if key == "cu_seqlens" or not per_token:
            out[key] = value
            continue
        whole = to_padded(value[0], layout, FILL.get(key, 0))
        out[key] = (whole if key in WHOLE_ROW_KEYS else whole.index_select(0, index.to(whole.device)))[None]
    out["cu_seqlens"] = layout.local_cu_seqlens()
    out[CP_INDEX] = index
    out[CP_CU_SEQLENS] = layout.cu_seqlens
    out[CP_CU_SEQLENS_PADDED] = layout.cu_seqlens_padded
    return out, layout


def gather_row(local: torch.Tensor, layout: CPLayout, group) -> torch.Tensor:
    """All-gathers every CP rank's ``[L_padded / cp, ...]`` (collective over ``group``) and
    returns the original row's ``[L, ...]`` on every rank. No gradient (outputs only)."""
    parts = [torch.empty_like(local) for _ in range(layout.cp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return restore_row(parts, layout)


class _SumOverCP(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward.

    Megatron's convention with CP: each rank back-propagates its own loss; the schedule
    multiplies it by the CP size and DDP averages gradients over DP x CP, so the parameter
    gradient is the sum over CP ranks of what each rank's backward produced. A loss that is
    a function of per-sample sums split over CP ranks is evaluated whole on every rank; the
    identity backward sends d loss / d sum to this rank's tokens only, and the CP ranks'
    gradients add up to the whole one (an all-reduce here would count it ``cp`` times).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_cp(x: torch.Tensor, group) -> torch.Tensor:
    """Sums ``x`` (per-sample partial sums of this rank's tokens) over the CP ``group``;
    differentiable with the identity backward of :class:`_SumOverCP`."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _SumOverCP.apply(x, group)


def balanced_work(cu_seqlens_padded: torch.Tensor, cp: int, rank: int) -> int:
    """Causal-attention work (query-key pairs) of CP rank ``rank``'s tokens: for checks of the
    load balance (every rank's is the same)."""
    bounds = cu_seqlens_padded.tolist()
    work = 0
    for start in rank_indices(cu_seqlens_padded, cp, rank).tolist():
        seg = next(i for i in range(len(bounds) - 1) if bounds[i] <= start < bounds[i + 1])
        work += start - bounds[seg] + 1
    return work
