"""Packing variable-length samples into micro-batches under a token budget.

First-fit decreasing (Johnson, 1973): samples sorted by length, longest first, each
placed into the first micro-batch with room, a new one opened otherwise; it uses at most
11/9 OPT + 6/9 micro-batches. A packed micro-batch is one row ``[1, L]`` in which every
sample keeps its boundaries: position ids restart at 0 per sample and ``cu_seqlens``
marks the boundaries, which reach the model as Megatron's ``PackedSeqParams`` (THD) so
that attention stays within each sample (Transformer Engine's varlen kernel, or
``models.r1v.attention.SegmentAttention``; no ``[L, L]`` mask is ever built). Padding, when
a row is padded to a fixed length, is a segment of its own. The images are concatenated in
the order their ``<IMG_CONTEXT>`` tokens appear, which is the order ``R1VModel``
scatters image features in.

Context parallelism (``parallel.cp``) pads every sample of a row to a multiple of ``2 * cp``
when it splits the row (``models.r1v.context_parallel``); ``seq_multiple`` makes the packer
count those padded lengths against the budget, so the padded row still fits it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .template import IGNORE_INDEX, EncodedSample


def first_fit_decreasing(lengths: Sequence[int], budget: int, names: Optional[Sequence[str]] = None) -> list[list[int]]:
    """Bins of sample indices (each bin's lengths sum to <= ``budget``), longest first.

    Ties keep input order, so the plan is deterministic.
    """
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > budget:
            name = names[i] if names is not None else f"#{i}"
            raise ValueError(f"sample {name} has {lengths[i]} tokens, more than the token budget {budget}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


@dataclass
class PackedMicroBatch:
    input_ids: torch.Tensor  # [1, L]
    labels: torch.Tensor  # [1, L], IGNORE_INDEX outside responses and on padding
    loss_mask: torch.Tensor  # [1, L] float, 1 where labels are targets
    position_ids: torch.Tensor  # [1, L], restarting at 0 per sample
    cu_seqlens: torch.Tensor  # [n_segments + 1] int32; padding, if any, is the last segment
    pixel_values: Optional[torch.Tensor]  # [total tiles, 3, S, S] in image-token order, or None
    sample_ids: list[str]
    sample_indices: list[int]  # positions of the samples in the packer's input



def pack_samples(
    samples: Sequence[EncodedSample],
    pixel_values: Sequence[Optional[torch.Tensor]],
    token_budget: int,
    pad_id: int,
    pad_to_multiple: int = 1,
    groups: Optional[Sequence[Sequence[int]]] = None,
    seq_multiple: int = 1,
) -> list[PackedMicroBatch]:
    """Packs ``samples`` (with each one's tiles ``[n_tiles, 3, S, S]`` or None) by FFD.

    ``pad_to_multiple`` pads each micro-batch's length (e.g. to the TP size for sequence
    parallelism); padding is a separate segment with no targets. ``groups`` (sample
    indices, each sample in exactly one group) keeps a group in one micro-batch, in its
    order: a loss over a group (MPO's chosen and rejected of a pair) then needs nothing
    from other micro-batches. ``seq_multiple`` (context parallelism: ``2 * cp``, see the module
    docstring): samples count as their length rounded up to it, and ``pad_to_multiple``
    applies to the rounded row (it must then be 1 or a multiple of ``seq_multiple``).
    """
    if seq_multiple < 1 or (pad_to_multiple > 1 and pad_to_multiple % seq_multiple):
        raise ValueError(f"pad_to_multiple ({pad_to_multiple}) must be 1 or a multiple of seq_multiple "
                         f"({seq_multiple}, the context-parallel padding of every sample)")
    if len(pixel_values) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(pixel_values)} pixel_values entries")
    for sample, pixels in zip(samples, pixel_values):
        n_tiles = 0 if pixels is None else int(pixels.shape[0])
        if n_tiles != sum(sample.tiles_per_image):
            raise ValueError(f"sample {sample.sample_id}: {n_tiles} image tiles given, its tokens expect "
                             f"{sum(sample.tiles_per_image)} ({list(sample.tiles_per_image)} per image)")
    if groups is None:
        groups = [[i] for i in range(len(samples))]
    if sorted(i for g in groups for i in g) != list(range(len(samples))):
        raise ValueError(f"groups must hold each of the {len(samples)} sample indices exactly once")
    bins = first_fit_decreasing([sum(_rounded(len(samples[i]), seq_multiple) for i in g) for g in groups],
                                token_budget,
                                ["+".join(samples[i].sample_id for i in g) for g in groups])
    plan = [[i for g in members for i in groups[g]] for members in bins]
    return [_pack_bin([samples[i] for i in members], [pixel_values[i] for i in members], members, pad_id,
                      pad_to_multiple, seq_multiple) for members in plan]


def _rounded(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _pack_bin(samples, pixel_values, indices, pad_id: int, pad_to_multiple: int,
              seq_multiple: int = 1) -> PackedMicroBatch:
    ids = [s.input_ids for s in samples]
    labels = [s.labels for s in samples]
    positions = [torch.arange(len(s)) for s in samples]
    lengths = [len(s) for s in samples]
    # With seq_multiple the CP split adds each sample's rounding; the padding segment tops
    # the rounded row up (it is a multiple of seq_multiple itself, so the split adds nothing to it).
    pad = -sum(_rounded(n, seq_multiple) for n in lengths) % pad_to_multiple
    if pad:
        ids.append(torch.full((pad,), pad_id, dtype=torch.long))
        labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
        positions.append(torch.arange(pad))
        lengths.append(pad)
    labels_L = torch.cat(labels)
    tiles = [p for p in pixel_values if p is not None and p.shape[0]]
    return PackedMicroBatch(
        input_ids=torch.cat(ids)[None],
        labels=labels_L[None],
        loss_mask=(labels_L != IGNORE_INDEX).float()[None],
        position_ids=torch.cat(positions)[None],
        cu_seqlens=torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        pixel_values=torch.cat(tiles) if tiles else None,
        sample_ids=[s.sample_id for s in samples],
        sample_indices=list(indices),
    )


def pack_pairs(items: Sequence, token_budget: int, pipeline: bool, seq_multiple: int = 1) -> list[PackedMicroBatch]:
    """Packs ``data.loader.PairItem`` s, each pair's chosen (sample 2k) and rejected (2k+1)
    in one row; ``pipeline``: pad every row to the budget (PP needs one shape);
    ``seq_multiple``: context parallelism's per-sample padding (:func:`pack_samples`)."""
    samples = [s for it in items for s in (it.chosen, it.rejected)]
    pixels = [it.pixel_values for it in items for _ in range(2)]
    return pack_samples(samples, pixels, token_budget, pad_id=0, pad_to_multiple=token_budget if pipeline else 1,
                        groups=[[2 * k, 2 * k + 1] for k in range(len(items))], seq_multiple=seq_multiple)


def pack_conversations(items: Sequence, token_budget: int, pipeline: bool,
                       seq_multiple: int = 1) -> list[PackedMicroBatch]:
    """Packs ``data.loader.SFTItem`` s (whole conversations, each with its images) by FFD;
    ``pipeline``: pad every row to the budget (PP needs one shape); ``seq_multiple``:
    context parallelism's per-sample padding (:func:`pack_samples`)."""
    return pack_samples([it.sample for it in items], [it.pixel_values for it in items], token_budget, pad_id=0,
                        pad_to_multiple=token_budget if pipeline else 1, seq_multiple=seq_multiple)
