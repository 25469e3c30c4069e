"""Reading and writing HF safetensors checkpoints one tensor at a time.

:class:`HFCheckpointReader` opens a checkpoint directory (``model.safetensors`` or
shards listed in ``model.safetensors.index.json``) lazily: only the headers are parsed up
front, and ``read(name, index)`` reads one tensor, or the rows/columns of it a caller
needs, with plain file reads. :class:`ShardedSafetensorsWriter` plans shards from
known shapes and streams each tensor to disk as it is added; peak memory is one
tensor. Errors name the file and tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_r1v.checkpoint.box_io import read_box

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match the expected model."""


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"1024"`` -> bytes (decimal units, as HF uses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    return int(number * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit])


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors file, from its header."""

    dtype: Optional[torch.dtype]
    """None for a safetensors dtype conversion has no use for (an error if it is read)."""
    dtype_name: str
    shape: tuple[int, ...]
    offset: int
    """Absolute file offset of its first byte."""


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """``index`` (unit-step slices of the leading dims) as the box ``[lo, hi)``."""
    if len(index) > len(shape):
        raise ValueError(f"index {index} has more dims than shape {shape}")
    lo, hi = [0] * len(shape), list(shape)
    for j, part in enumerate(index):
        start, stop, step = part.indices(shape[j])
        if step != 1:
            raise ValueError(f"index {index} has a step; only contiguous slices are read")
        lo[j], hi[j] = start, max(start, stop)
    return lo, hi


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"HF checkpoint directory {self.directory} does not exist")
        self._headers: dict[Path, dict[str, _Entry]] = {}
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
            self.file_of = {name: self.directory / file for name, file in weight_map.items()}
        elif (self.directory / SINGLE_NAME).exists():
            single = self.directory / SINGLE_NAME
            self.file_of = {name: single for name in self._header(single)}
        else:
            raise CheckpointError(f"{self.directory} has neither {INDEX_NAME} nor {SINGLE_NAME}")

    def _header(self, path: Path) -> dict[str, _Entry]:
        """The tensors of one file (parsed once): dtype, shape and where the bytes are."""
        if path in self._headers:
            return self._headers[path]
        if not path.exists():
            raise CheckpointError(f"safetensors file {path} is listed but missing")
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                length = int.from_bytes(file.read(8), "little")
                if length > size - 8:
                    raise ValueError(f"header length {length} exceeds the file ({size} bytes)")
                header = json.loads(file.read(length))
            entries = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype = _DTYPES_BY_NAME.get(info["dtype"])
                shape = tuple(int(n) for n in info["shape"])
                begin, end = (int(n) for n in info["data_offsets"])
                fits = dtype is None or end - begin == math.prod(shape) * dtype.itemsize
                if not fits or not 0 <= begin <= end or 8 + length + end > size:
                    raise ValueError(f"tensor {name!r}: data offsets {[begin, end]} do not fit {shape} {dtype}")
                entries[name] = _Entry(dtype, info["dtype"], shape, 8 + length + begin)
        except KeyError as err:
            raise CheckpointError(f"safetensors file {path} is corrupt or unreadable: missing field {err}") from None
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise CheckpointError(f"safetensors file {path} is corrupt or unreadable: {err}") from None
        self._headers[path] = entries
        return entries

    def _entry(self, name: str) -> tuple[Path, _Entry]:
        path = self.file_of.get(name)
        if path is None:
            raise KeyError(name)
        entry = self._header(path).get(name)
        if entry is None:
            raise CheckpointError(f"{path} has no tensor {name!r}, though {INDEX_NAME} lists it there")
        return path, entry

    def names(self) -> list[str]:
        return list(self.file_of)

    def config(self) -> dict:
        path = self.directory / "config.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its file header, without reading the data."""
        return self._entry(name)[1].shape

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype from its file header; CheckpointError for a dtype :meth:`read` cannot read."""
        path, entry = self._entry(name)
        if entry.dtype is None:
            raise CheckpointError(f"tensor {name!r} in {path} has dtype {entry.dtype_name}, "
                                  "which conversion does not read")
        return entry.dtype

    def get(self, name: str) -> torch.Tensor:
        """One tensor by HF name; KeyError names the tensor when it is absent."""
        return self.read(name)

    def read(self, name: str, index: tuple[slice, ...] = (), out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Part of one tensor, ``index`` slicing its leading dims (unit steps), into ``out``
        (converting the dtype) or a new tensor. Only the bytes inside the part are read,
        with plain reads: a mapped file would count every touched page as resident."""
        path, entry = self._entry(name)
        if entry.dtype is None:
            raise CheckpointError(f"tensor {name!r} in {path} has dtype {entry.dtype_name}, "
                                  "which conversion does not read")
        lo, hi = _box(index, entry.shape)
        sizes = tuple(h - l for l, h in zip(lo, hi))
        if out is None:
            out = torch.empty(sizes, dtype=entry.dtype)
        elif tuple(out.shape) != sizes:
            raise ValueError(f"tensor {name!r}{list(index)} has shape {sizes}; out has {tuple(out.shape)}")
        try:
            with open(path, "rb", buffering=0) as file:
                read_box(file, entry.offset, entry.shape, entry.dtype, lo, hi, out)
        except (OSError, EOFError) as err:
            raise CheckpointError(f"tensor {name!r} in {path} cannot be read: {err}") from None
        return out

    def close(self) -> None:
        """Nothing stays open between reads; kept so the reader works as a context manager."""

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


class ShardedSafetensorsWriter:
    """Streams tensors into ``model-0000i-of-0000n.safetensors`` shards plus the index.

    The shard plan (names, shapes, dtypes, in write order) is fixed up front, so each
    shard's header is written first and every tensor's bytes go to disk as soon as it
    is added: memory holds one tensor, not one shard.
    """

    def __init__(self, directory: str | Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int) -> None:
        self.directory = Path(directory)
        self._order = [name for name, _, _ in plan]
        self._spec = {name: (tuple(shape), dtype) for name, shape, dtype in plan}
        self._shards: list[list[str]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if self._shards[-1] and size + nbytes > max_shard_bytes:
                self._shards.append([])
                size = 0
            self._shards[-1].append(name)
            size += nbytes
        self.total_bytes = sum(torch.Size(s).numel() * d.itemsize for s, d in self._spec.values())
        self._next = 0
        self._file = None
        self._shard_index = -1
        self._remaining_in_shard = 0

    def _file_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{len(self._shards):05d}.safetensors"

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._shard_index += 1
        names = self._shards[self._shard_index]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            shape, dtype = self._spec[name]
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        self._file = open(self.directory / (self._file_name(self._shard_index) + ".tmp"), "wb")
        self._file.write(len(encoded).to_bytes(8, "little") + encoded)
        self._remaining_in_shard = len(names)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"writer expected tensor {expected!r} next, got {name!r}")
        shape, dtype = self._spec[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}; planned {shape} {dtype}")
        if self._remaining_in_shard == 0:
            self._open_next_shard()
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._remaining_in_shard -= 1
        self._next += 1

    def finish(self) -> list[Path]:
        """Closes the last shard, gives shards their final names, writes the index."""
        if self._next != len(self._order):
            raise ValueError(f"writer got {self._next} of {len(self._order)} planned tensors")
        if self._file is not None:
            self._file.close()
        weight_map, files = {}, []
        for i, names in enumerate(self._shards):
            final = self.directory / self._file_name(i)
            os.replace(self.directory / (final.name + ".tmp"), final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return files


def copy_side_files(source: Optional[Path], target: Path) -> list[str]:
    """Copies tokenizer files and generation_config.json when the source has them."""
    import shutil

    if source is None or not source.is_dir():
        return []
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and (path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens"))
                               or path.name in ("generation_config.json", "chat_template.jinja")):
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
    return copied
