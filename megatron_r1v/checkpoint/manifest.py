"""Checkpoint integrity: a manifest of every file with its size and SHA-256, written last.

    <checkpoint>/manifest.json
        {"format": "megatron_r1v.manifest", "version": 1, "algorithm": "sha256",
         "files": {"model/__0_0.distcp": {"size": 123, "sha256": "..."}, ...}}

Training checkpoints (``trainer/checkpoint.py``: model fragments, per-rank optimizer / RNG
files, every SSB array, ``trainer.json`` with the data cursor) and imported model
checkpoints (``tools/convert_checkpoint.py import``) carry one at their root; the
reference-log-prob cache hashes its own file (``trainer/reference_cache.py``). The
manifest is written into the temporary folder after every other file and before the
folder is committed, so a committed checkpoint always has a complete one.

Readers call :func:`verify` before they trust a folder: ``--resume`` (the whole
checkpoint), a run starting from ``model.checkpoint`` and ``export`` (the model folder, by
its own manifest or its parent's entries), and ``tools/verify_checkpoint.py --integrity``
offline. The first bad file is named with the cause: missing, truncated (size), or
altered (hash). Hashing is split over the ranks of a multi-rank writer or reader, each
taking every world-th file, so its cost falls with the job size (docs/benchmarks.md).
A folder written before manifests existed has none: it is read with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_r1v.atomic_dir import write_text_atomic
from megatron_r1v.checkpoint.hf_io import CheckpointError
from megatron_r1v.platform import collective_device, first_failure

MANIFEST_NAME = "manifest.json"
FORMAT = "megatron_r1v.manifest"
_READ_CHUNK = 1 << 24  # 16 MiB reads: large enough for full hashing speed, small enough for any host


class CheckpointIntegrityError(CheckpointError):
    """A file of a checkpoint is missing, truncated or differs from its manifest."""


def list_files(root: Path) -> list[str]:
    """Every file under ``root`` (POSIX paths relative to it, sorted), the manifest excepted."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST_NAME)


def hash_file(path: Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def _world(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def write_manifest(root: Path, group: Optional[dist.ProcessGroup] = None) -> Optional[Path]:
    """Hashes every file under ``root`` (collective over ``group``: each rank a share) and
    writes the manifest from rank 0 of the group; returns its path there, None elsewhere."""
    root = Path(root)
    rank, world = _world(group)
    files = list_files(root)
    mine = {name: hash_file(root / name) for name in _share(files, rank, world)}
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine, group=group)
    if rank != 0:
        return None
    entries = {name: entry for part in everyone for name, entry in part.items()}
    manifest = {"format": FORMAT, "version": 1, "algorithm": "sha256", "files": dict(sorted(entries.items()))}
    return write_text_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def find_manifest(folder: Path) -> Optional[tuple[Path, str]]:
    """(manifest, prefix of ``folder``'s entries in it): its own, or its parent's (the
    ``model/`` folder of a training checkpoint); None when neither exists."""
    folder = Path(folder)
    if (folder / MANIFEST_NAME).is_file():
        return folder / MANIFEST_NAME, ""
    if (folder.parent / MANIFEST_NAME).is_file():
        return folder.parent / MANIFEST_NAME, folder.name + "/"
    return None


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointIntegrityError(f"{path}: not a readable manifest ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"),
                                                                                           dict):
        raise CheckpointIntegrityError(f"{path}: not a megatron-r1v manifest (format {manifest.get('format')!r})"
                                       if isinstance(manifest, dict) else f"{path}: not a megatron-r1v manifest")
    return manifest


def check_file(path: Path, entry: dict) -> Optional[str]:
    """What is wrong with ``path`` against its manifest ``entry``, or None."""
    if not path.is_file():
        return f"{path}: missing (the manifest lists it)"
    size = path.stat().st_size
    if size != entry["size"]:
        kind = "truncated" if size < entry["size"] else "longer than written"
        return f"{path}: {kind}: {size} bytes, the manifest says {entry['size']}"
    if hash_file(path)["sha256"] != entry["sha256"]:
        return f"{path}: content differs from the manifest (SHA-256 mismatch: the file was altered or damaged)"
    return None


def verify(folder: str | Path, group: Optional[dist.ProcessGroup] = None) -> int:
    """Checks ``folder``'s files against its manifest (collective over ``group`` when
    distributed: each rank a share); raises :class:`CheckpointIntegrityError` naming the
    first bad file on every rank. Returns the number of files checked (0: no manifest)."""
    folder = Path(folder)
    found = find_manifest(folder)
    if found is None:
        warnings.warn(f"{folder} has no {MANIFEST_NAME} (written before integrity checks existed): its files are "
                      "not verified", stacklevel=2)
        return 0
    path, prefix = found
    entries = {name[len(prefix):]: entry for name, entry in _read_manifest(path)["files"].items()
               if name.startswith(prefix)}
    if not entries:
        raise CheckpointIntegrityError(f"{path} lists no file of {folder}")
    rank, world = _world(group)
    names = sorted(entries)
    problems = [p for name in _share(names, rank, world) if (p := check_file(folder / name, entries[name]))]
    first = first_failure(problems[0] if problems else None, collective_device(group), group)
    if first is not None:
        raise CheckpointIntegrityError(f"checkpoint {folder} failed its integrity check: {first}")
    return len(names)
