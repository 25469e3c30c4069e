"""Reading a box of a row-major array kept at some offset of a file, straight into a tensor.

Both checkpoint formats conversion reads keep every tensor as raw row-major bytes at a
known file offset: safetensors files, and the ``torch.save`` records inside torch_dist
``.distcp`` files. Plain reads into the destination keep memory at the destination plus
one bounded buffer. A memory-mapped file would not: every page touched through a mapping
counts in the process's resident set for as long as the mapping lives, and fault-around
maps neighbouring pages too, so a column slice of a mapped tensor costs the whole tensor.
"""

from __future__ import annotations

import itertools
import math
from typing import BinaryIO, Sequence

import torch

BUFFER_BYTES = 16 * 2**20
"""Bound on the staging buffer for parts that cannot be read straight into the destination."""


def _read_exact(file: BinaryIO, offset: int, view: memoryview) -> None:
    file.seek(offset)
    done = 0
    while done < len(view):  # one read() returns at most ~2 GiB on Linux
        n = file.readinto(view[done:])
        if not n:
            raise EOFError(f"{getattr(file, 'name', 'file')} ends at byte {offset + done}; "
                           f"{len(view) - done} more bytes were expected")
        done += n


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """Writable bytes of a contiguous tensor."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


def read_box(
    file: BinaryIO, data_offset: int, shape: Sequence[int], dtype: torch.dtype,
    lo: Sequence[int], hi: Sequence[int], out: torch.Tensor, *, buffer_bytes: int = BUFFER_BYTES,
) -> None:
    """Copies ``array[lo:hi]`` into ``out`` (shape ``hi - lo``, any dtype and strides).

    ``array`` is the row-major ``shape``/``dtype`` array whose bytes start at
    ``data_offset`` of ``file`` (opened unbuffered, ``buffering=0``). Runs of the array
    that are also contiguous in ``out`` (same dtype) are read into ``out`` directly; the
    rest go through a buffer of at most ``buffer_bytes`` (or one innermost row).
    """
    ndim = len(shape)
    assert len(lo) == len(hi) == ndim and tuple(out.shape) == tuple(h - l for l, h in zip(lo, hi)), (lo, hi, out.shape)
    if out.numel() == 0:
        return
    if ndim == 0:  # a scalar: one element, as a one-element box
        shape, lo, hi, out = (1,), (0,), (1,), out.view(1)
        ndim = 1
    itemsize = dtype.itemsize
    strides = [math.prod(shape[j + 1:]) for j in range(ndim)]
    # Slabs run along dim k with every later dim whole: the shallowest k whose one index
    # still fits the buffer (the last dim always qualifies, one element at a time at worst).
    k = next(j for j in range(ndim) if j == ndim - 1 or strides[j] * itemsize <= buffer_bytes)
    unit = strides[k] * itemsize
    step = max(1, buffer_bytes // unit)
    inner_whole = all(lo[j] == 0 and hi[j] == shape[j] for j in range(k + 1, ndim))
    inner = tuple(slice(lo[j], hi[j]) for j in range(k + 1, ndim))
    buffer = None
    for outer in itertools.product(*(range(lo[j], hi[j]) for j in range(k))):
        base = sum(i * s for i, s in zip(outer, strides))
        dst_outer = tuple(i - l for i, l in zip(outer, lo))
        for a in range(lo[k], hi[k], step):
            b = min(a + step, hi[k])
            offset = data_offset + (base + a * strides[k]) * itemsize
            dst = out[(*dst_outer, slice(a - lo[k], b - lo[k]))]
            if inner_whole and dst.dtype == dtype and dst.is_contiguous():
                _read_exact(file, offset, _bytes_of(dst))
                continue
            if buffer is None:
                buffer = torch.empty(step * unit, dtype=torch.uint8)
            staged = buffer[: (b - a) * unit]
            _read_exact(file, offset, _bytes_of(staged))
            slab = staged.view(dtype).view(b - a, *shape[k + 1:])
            dst.copy_(slab[(slice(None), *inner)])
