"""Reading and writing HF safetensors checkpoints one tensor at a time.

:class:`HFCheckpointReader` opens a checkpoint directory (``model.safetensors`` or
shards listed in ``model.safetensors.index.json``) lazily: ``get(name)`` reads that one
tensor from its file. :class:`ShardedSafetensorsWriter` accepts tensors in order and
flushes a shard whenever the next tensor would exceed the size limit, then writes the
index; peak memory is one shard. Errors name the file and tensor.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"HF checkpoint directory {self.directory} does not exist")
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
            self.file_of = {name: self.directory / file for name, file in weight_map.items()}
        elif (self.directory / SINGLE_NAME).exists():
            single = self.directory / SINGLE_NAME
            self.file_of = {name: single for name in self._keys_of(single)}
        else:
            raise CheckpointError(f"{self.directory} has neither {INDEX_NAME} nor {SINGLE_NAME}")
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _open(path: Path):
        if not path.exists():
            raise CheckpointError(f"safetensors file {path} is listed but missing")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"safetensors file {path} is corrupt or unreadable: {err}") from None

    def _keys_of(self, path: Path) -> list[str]:
        with self._open(path) as handle:
            return list(handle.keys())

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
        self.get_handle(name)
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def get_handle(self, name: str):
        path = self.file_of.get(name)
        if path is None:
            raise KeyError(name)
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._open(path).__enter__()
        return handle

    def get(self, name: str) -> torch.Tensor:
        """One tensor by HF name; KeyError names the tensor when it is absent."""
        handle = self.get_handle(name)
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"tensor {name!r} in {self.file_of[name]} cannot be read: {err}") from None

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardedSafetensorsWriter:
    """Streams tensors into ``model-0000i-of-0000n.safetensors`` shards plus the index."""

    def __init__(self, directory: str | Path, max_shard_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, str(self.directory / f"shard-{index:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Flushes the last shard, gives shards their final names, writes the index."""
        if self._pending:
            self._flush()
        total = len(self._shards)
        weight_map, files = {}, []
        for i, names in enumerate(self._shards):
            final = self.directory / f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / f"shard-{i:05d}.tmp", final)
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
