"""Megatron ``torch_dist`` checkpoints written and read one fragment at a time.

A ``torch_dist`` checkpoint is a torch.distributed.checkpoint (DCP) directory: per-rank
``__R_I.distcp`` files holding one ``torch.save`` record per tensor fragment, a
``.metadata`` pickle (global shape, dtype and fragments of every tensor, and where each
fragment's record lies), plus Megatron's ``metadata.json`` and ``common.pt``.

* :class:`StreamingSaveStrategy` writes that format for ``dist_checkpointing.save``
  but makes each fragment's data only when the writer reaches it. Megatron's own
  ``torch_dist`` strategy stages every tensor of a rank before the first byte is written
  (``FileSystemWriterAsync.prepare_write_data``), so a rank would hold its whole shard;
  this one holds the fragment being written plus at most :data:`FILE_BYTES` of others.
* :class:`TorchDistReader` reads any box of a stored tensor straight from the
  ``.distcp`` files. DCP's own reader ``torch.load``s every fragment it touches in full
  before copying the requested part, so its memory grows with the fragments the saving
  job happened to write; this reader copies only the requested part, through a bounded
  buffer, and needs no process group.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import is_main_replica
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, TensorWriteData, WriteItem, WriteItemType

from megatron_r1v.checkpoint.box_io import read_box
from megatron_r1v.checkpoint.hf_io import CheckpointError

# --- writing ------------------------------------------------------------------------------

FILE_BYTES = 64 * 2**20
"""Roughly how much fragment data goes into one ``.distcp`` file (one large fragment alone).

torch's filesystem writer keeps every tensor of a file referenced until the file is
complete (torch 2.13 collects them for its safetensors option even when writing
``torch.save`` records), so one file per rank would hold the rank's shard again. Files of
this size bound that; a 38B model at TP=8 gets ~150 files per rank."""


class _StreamingPlanner(DefaultSavePlanner):
    """A save plan made from fragment descriptions alone; data is asked for per item."""

    def __init__(self, items: list[WriteItem], resolve: Callable[[WriteItem], torch.Tensor]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = items
        self._resolve = resolve

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        # DCP's filesystem writer calls this item by item as it writes (with one
        # writer thread), which is what lets a fragment exist only while it is written.
        return self._resolve(write_item)


def _item_bytes(item: WriteItem) -> int:
    data = item.tensor_data
    return math.prod(data.chunk.sizes) * data.properties.dtype.itemsize if data is not None else 0


class _FileBoundedWriter(dcp.FileSystemWriter):
    """DCP's filesystem writer with a rank's items spread over files of about ``file_bytes``."""

    def __init__(self, path: str, file_bytes: int) -> None:
        # One writer thread: several would each hold the fragment they are writing.
        super().__init__(path, single_file_per_rank=True, thread_count=1)
        self._file_bytes = file_bytes

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future:
        groups: list[list[WriteItem]] = [[]]
        size = 0
        for item in plan.items:
            if groups[-1] and size >= self._file_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += _item_bytes(item)
        results = []
        for i, items in enumerate(groups):
            # Each group is written as a plan of its own, under its own file name prefix
            # ("__<rank>_<group>_"), so its tensors are released when its file is done.
            prefix = dataclasses.replace(plan.storage_data, prefix=f"{plan.storage_data.prefix}{i}_")
            results += super().write_data(dataclasses.replace(plan, items=items, storage_data=prefix), planner).wait()
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(results)
        return done


class StreamingSaveStrategy(SaveShardedStrategy):
    """The ``torch_dist`` format, with every fragment's data made by ``produce`` on demand.

    The ShardedTensors given to ``dist_checkpointing.save`` only describe fragments (their
    data may be meta tensors); ``produce(sharded_tensor)`` returns the fragment's data,
    exactly ``local_shape`` and ``dtype``, with a storage of its own size (DCP copies
    views of larger storages). Only main replicas are written, as Megatron does.
    """

    def __init__(self, produce: Callable[[ShardedTensor], torch.Tensor]) -> None:
        super().__init__("torch_dist", 1)
        self._produce = produce

    def save(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> None:
        fragments: dict[tuple[str, tuple[int, ...]], ShardedTensor] = {}
        items = []
        for st in nested_values(sharded_state_dict):
            if not isinstance(st, ShardedTensor) or st.flattened_range is not None or st.prepend_axis_num:
                raise TypeError(f"{type(st).__name__} {getattr(st, 'key', '')!r}: only plain ShardedTensors "
                                "can be written by the streaming strategy")
            if not is_main_replica(st.replica_id):
                continue
            offsets = torch.Size(st.global_offset)
            fragments[(st.key, tuple(offsets))] = st
            items.append(WriteItem(
                index=MetadataIndex(st.key, offsets), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(st.local_shape)),
                    properties=TensorProperties(dtype=st.dtype), size=torch.Size(st.global_shape),
                ),
            ))

        def resolve(item: WriteItem) -> torch.Tensor:
            st = fragments[(item.index.fqn, tuple(item.index.offset))]
            data = self._produce(st)
            assert tuple(data.shape) == tuple(st.local_shape) and data.dtype == st.dtype, (st.key, data.shape)
            return data

        writer = _FileBoundedWriter(str(checkpoint_dir), FILE_BYTES)
        dcp.save({}, storage_writer=writer, planner=_StreamingPlanner(items, resolve))


# --- reading ------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "BFloat16Storage": torch.bfloat16, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _SavedTensor:
    """What ``torch.save`` recorded about a tensor: its storage record and view of it."""

    storage_key: str
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _saved_tensor(storage: tuple[torch.dtype, str], storage_offset: int, size, stride, *_) -> _SavedTensor:
    return _SavedTensor(storage[1], storage[0], storage_offset, tuple(size), tuple(stride))


class _LayoutUnpickler(pickle.Unpickler):
    """Reads a ``torch.save``d tensor's ``data.pkl`` for its layout, never its data; any
    other content is refused (the record is then loaded by ``torch.load`` instead)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _saved_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return pid[1], str(pid[2])


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, as a seekable file of their own."""

    def __init__(self, file: BinaryIO, start: int, length: int) -> None:
        super().__init__()
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        if n == 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


def _is_row_major(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _raw_offset(file: BinaryIO, start: int, length: int, sizes: tuple[int, ...], dtype: torch.dtype) -> Optional[int]:
    """File offset where the record at ``[start, start + length)`` keeps the fragment's
    row-major bytes, or None when it is not a plain ``torch.save`` of one such tensor."""
    if sys.byteorder != "little":
        return None
    try:
        with zipfile.ZipFile(_Window(file, start, length)) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                return None
            prefix = pickles[0][: -len("data.pkl")]
            if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
                return None
            saved = _LayoutUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
            if not (isinstance(saved, _SavedTensor) and saved.dtype == dtype and saved.size == sizes
                    and _is_row_major(saved.size, saved.stride)):
                return None
            info = archive.getinfo(f"{prefix}data/{saved.storage_key}")
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            if info.file_size < (saved.storage_offset + math.prod(sizes)) * dtype.itemsize:
                return None
        file.seek(start + info.header_offset)
        local = file.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return start + info.header_offset + 30 + name_len + extra_len + saved.storage_offset * dtype.itemsize
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError):
        return None


@dataclass(frozen=True)
class _Fragment:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: Path
    start: int
    length: int
    transformed: bool


class TorchDistReader:
    """Boxes of the tensors of a ``torch_dist`` checkpoint, read in one process."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        config_path = self.directory / "metadata.json"
        try:
            backend = json.loads(config_path.read_text()).get("sharded_backend")
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{config_path}: not a Megatron dist checkpoint ({err})") from None
        if backend != "torch_dist":
            raise CheckpointError(f"{config_path}: sharded backend is {backend!r}; only 'torch_dist' is read")
        try:
            metadata = dcp.FileSystemReader(str(self.directory)).read_metadata()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise CheckpointError(f"{self.directory / '.metadata'} cannot be read: {err}") from None
        self._meta = {key: md for key, md in metadata.state_dict_metadata.items()
                      if isinstance(md, TensorStorageMetadata)}
        sizes_of = {(key, tuple(c.offsets)): tuple(c.sizes) for key, md in self._meta.items() for c in md.chunks}
        self._fragments: dict[str, list[_Fragment]] = collections.defaultdict(list)
        for index, info in metadata.storage_data.items():
            offsets = tuple(index.offset or ())
            if index.fqn in self._meta:
                self._fragments[index.fqn].append(_Fragment(
                    offsets, sizes_of[(index.fqn, offsets)], self.directory / info.relative_path, info.offset,
                    info.length, bool(getattr(info, "transform_descriptors", None)),
                ))
        self._raw: dict[_Fragment, Optional[int]] = {}

    def keys(self) -> list[str]:
        """The stored tensors' keys, sorted."""
        return sorted(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta_of(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._meta_of(key).properties.dtype

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def _meta_of(self, key: str) -> TensorStorageMetadata:
        if key not in self._meta:
            raise CheckpointError(f"{self.directory}: checkpoint has no tensor {key!r}")
        return self._meta[key]

    def read(self, key: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The box ``index`` (unit-step slices of the leading dims) of stored tensor ``key``."""
        shape, dtype = self.shape(key), self.dtype(key)
        lo, hi = [0] * len(shape), list(shape)
        for j, part in enumerate(index):
            start, stop, step = part.indices(shape[j])
            assert step == 1, index
            lo[j], hi[j] = start, max(start, stop)
        out = torch.empty([h - l for l, h in zip(lo, hi)], dtype=dtype)
        covered = 0
        for fragment in self._fragments[key]:
            f_lo = [max(a, o) for a, o in zip(lo, fragment.offsets)]
            f_hi = [min(b, o + s) for b, o, s in zip(hi, fragment.offsets, fragment.sizes)]
            if any(a >= b for a, b in zip(f_lo, f_hi)):
                continue
            dst = out[tuple(slice(a - l, b - l) for a, b, l in zip(f_lo, f_hi, lo))]
            self._copy(key, fragment, dtype, [a - o for a, o in zip(f_lo, fragment.offsets)],
                       [b - o for b, o in zip(f_hi, fragment.offsets)], dst)
            covered += dst.numel()
        if covered != out.numel():
            raise CheckpointError(f"{self.directory}: the fragments of {key!r} cover {covered} of the "
                                  f"{out.numel()} elements of {index or 'the tensor'}")
        return out

    def _copy(self, key: str, fragment: _Fragment, dtype: torch.dtype, lo: list[int], hi: list[int],
              dst: torch.Tensor) -> None:
        if fragment.transformed:
            raise CheckpointError(f"{fragment.path}: fragment of {key!r} is stored through a DCP stream "
                                  "transform (e.g. compression), which this reader does not decode")
        try:
            with open(fragment.path, "rb", buffering=0) as file:
                if fragment not in self._raw:
                    self._raw[fragment] = _raw_offset(file, fragment.start, fragment.length, fragment.sizes, dtype)
                raw = self._raw[fragment]
                if raw is not None:
                    read_box(file, raw, fragment.sizes, dtype, lo, hi, dst)
                    return
                # Not a plain record (another torch version's format): load it whole.
                data = torch.load(_Window(file, fragment.start, fragment.length), map_location="cpu",
                                  weights_only=True)
                dst.copy_(data[tuple(slice(a, b) for a, b in zip(lo, hi))])
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"{fragment.path}: fragment of {key!r} at {fragment.offsets} cannot be read: "
                                  f"{err}") from None
