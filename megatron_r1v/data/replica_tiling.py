"""One rank per model replica decodes and tiles; the ranks that need the pixels receive them.

Every rank of a replica (its TP x PP ranks, which see the same records) needs the token
layout of each image, i.e. its tiles per image, but only the first pipeline stage holds the
vision encoder, so only it needs pixels. Roles (:func:`tiling_role`):

- ``tile``: the first TP rank of the first pipeline stage (also the rollout engine's owner)
  runs the real tiler (``data.tilers.build_tiler``);
- ``receive``: its TP peers on the first stage get the tiles from it, one broadcast over the
  TP group per call, instead of decoding the files themselves;
- ``layout``: ranks on later pipeline stages open no image file: they receive each image's
  grid from their first-stage peer along the pipeline group, and hold a ``[tiles, 0]``
  placeholder for its pixels (see :func:`layout_only`): the tile count, no memory.
  (The grid depends only on the image size, but bad files are only found by decoding,
  so they need a message from the tiling rank anyway; it carries the grids too.)

The same holds at start-up: the load-time check of the training file's images (each fully
decoded, ``data.schema``) runs on the tiling ranks only, each on its share of the files, and
every rank applies the gathered verdicts (:func:`check_images_once`).

Failures are agreed on: whatever the tiling rank's tiler raises (an :class:`~.images.ImageError`
under ``on_bad_sample=error``, or anything else) is sent instead of tiles, and every rank of
the replica raises it, so no rank waits in a collective the others never reach; skipped images
(``on_bad_sample=skip``) are skipped on every rank alike. Every rank of a replica calls
:meth:`ReplicaTiler.tile_files` with the same paths in the same order (the loaders guarantee
it: the same records, the same code path), which is what makes the collectives line up.

With context parallelism each CP rank's TP group has its own tiling rank (CP peers share the
records but are not in one TP group). Pixels travel on the device collectives need (CUDA for
NCCL) and come back to CPU memory, where the loaders keep them as the PIL path does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_r1v.platform import collective_device, first_failure

from .images import DEFAULT_MAX_PIXELS, ImageError, check_image
from .tilers import SelectedTiler, build_tiler
from .tiling import Grid, PathLike, SkippedImage, TiledImage, Tiler, TilingConfig, TilingResult

if TYPE_CHECKING:
    from megatron_r1v.config import DataConfig
    from megatron_r1v.platform import ParallelContext

Role = Literal["tile", "receive", "layout"]


class TilingFailed(RuntimeError):
    """The replica's tiling rank failed on a batch of files (raised on its other ranks)."""


def tiling_role(tp_rank: int, pp_rank: int) -> Role:
    """What this rank does with images (module docstring)."""
    if pp_rank > 0:
        return "layout"
    return "tile" if tp_rank == 0 else "receive"


def layout_only(num_tiles: int) -> torch.Tensor:
    """``[num_tiles, 0]``: stands for pixels on a rank that needs only their count. It passes
    every tile-count check (``pack_samples``) and concatenates, yet holds no memory."""
    return torch.empty(num_tiles, 0, dtype=torch.float32)


@dataclass(frozen=True)
class _Failure:
    message: str
    path: Optional[str] = None
    """Set for an ImageError: the file, with ``reason``."""
    reason: Optional[str] = None

    @classmethod
    def of(cls, err: Exception) -> "_Failure":
        if isinstance(err, ImageError):  # re-raised as such: the loader's bad-sample policy applies
            return cls(str(err), err.path, err.reason)
        return cls(f"tiling rank {dist.get_rank()}: {type(err).__name__}: {err}")

    def error(self) -> Exception:
        return ImageError(self.path, self.reason) if self.path is not None else TilingFailed(self.message)


@dataclass(frozen=True)
class _Header:
    """What the tiling rank tells the replica about one ``tile_files`` call."""

    grids: tuple[Optional[Grid], ...] = ()
    """Per input path; None where the image was skipped."""
    tiles: tuple[int, ...] = ()
    """Tiles per input path (0 where skipped)."""
    skipped: tuple[SkippedImage, ...] = ()
    failure: Optional[_Failure] = None

    @classmethod
    def of(cls, result: TilingResult) -> "_Header":
        return cls(tuple(None if i is None else i.grid for i in result.images),
                   tuple(0 if i is None else i.num_tiles for i in result.images), tuple(result.skipped))


class ReplicaTiler:
    """The :class:`~.tiling.Tiler` of one rank of a replica (module docstring).

    ``tiler`` is the real backend on the ``tile`` rank and None elsewhere; ``tp_group`` and
    ``pp_group`` are this rank's groups (the replica's TP x PP ranks).
    """

    def __init__(self, tiler: Optional[Tiler], config: TilingConfig, role: Role,
                 tp_group: Optional[dist.ProcessGroup], pp_group: Optional[dist.ProcessGroup]):
        if (tiler is not None) != (role == "tile"):
            raise ValueError(f"a {role!r} rank {'needs' if role == 'tile' else 'takes no'} tiler")
        self.tiler, self.config, self.role = tiler, config, role
        self.tp_group, self.pp_group = tp_group, pp_group

    def tile_files(self, paths: Sequence[PathLike]) -> TilingResult:
        result, header, error = None, None, None
        if self.role == "tile":
            try:
                result = self.tiler.tile_files(paths)
                header = _Header.of(result)
            except Exception as err:  # any: the peers must hear of it rather than wait (module docstring)
                error, header = err, _Header(failure=_Failure.of(err))
        flat = None
        if self.role != "layout" and _size(self.tp_group) > 1:
            header = _broadcast_object(header, self.tp_group)
            if header.failure is None and sum(header.tiles):
                flat = self._broadcast_pixels(result, header)
        if _size(self.pp_group) > 1:
            header = _broadcast_object(header, self.pp_group)
        if header.failure is not None:
            raise error if error is not None else header.failure.error()
        if result is not None:
            return result
        return self._rebuild(paths, header, flat)

    def _broadcast_pixels(self, result: Optional[TilingResult], header: _Header) -> torch.Tensor:
        """All tiles of the call, ``[sum tiles, 3, S, S]`` float32, from the TP group's first rank."""
        device = collective_device(self.tp_group)
        if result is not None:
            kept = [image.pixel_values for image in result.images if image is not None]
            flat = (kept[0] if len(kept) == 1 else torch.cat(kept)).contiguous().to(device)
        else:
            S = self.config.image_size
            flat = torch.empty(sum(header.tiles), 3, S, S, dtype=torch.float32, device=device)
        dist.broadcast(flat, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return flat.cpu()  # CPU, as the tiling rank's own tiles (a no-op on gloo)

    def _rebuild(self, paths: Sequence[PathLike], header: _Header, flat: Optional[torch.Tensor]) -> TilingResult:
        """The tiling rank's result on a ``receive`` rank (real tiles) or a ``layout`` rank (placeholders)."""
        if len(header.grids) != len(paths):
            raise TilingFailed(f"the tiling rank tiled {len(header.grids)} files where this rank asked for "
                               f"{len(paths)}: the replica's ranks are out of step")
        images: list[Optional[TiledImage]] = []
        offset = 0
        for path, grid, n in zip(paths, header.grids, header.tiles):
            if grid is None:
                images.append(None)
                continue
            pixels = flat[offset:offset + n] if flat is not None else layout_only(n)
            images.append(TiledImage(pixel_values=pixels, grid=grid, source=str(path)))
            offset += n
        return TilingResult(images=images, skipped=list(header.skipped))


def _size(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _broadcast_object(obj, group: dist.ProcessGroup):
    """``obj`` from the group's first rank (the first TP rank / the first pipeline stage)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
    return holder[0]


def build_replica_tiler(ctx: "ParallelContext", data_cfg: "DataConfig", tiling_cfg: TilingConfig) -> SelectedTiler:
    """This rank's tiler in a training run, and a description of what the replica runs.

    Only ``tile`` ranks build the backend (and so only they load DALI or compile its
    operator); whether that worked is agreed over the world, so a ``data.tiler=dali`` that
    cannot run stops every rank with the same error (collective: every rank calls it).
    """
    role = tiling_role(ctx.tp_rank, ctx.pp_rank)
    selected, local = None, None
    if role == "tile":
        try:
            selected = build_tiler(data_cfg, tiling_cfg)
        except Exception as err:  # any: the other ranks must learn of it (module docstring)
            local = f"rank {ctx.rank}: {err}"
    failed = first_failure(local, collective_device(), None)
    if failed is not None:
        raise ValueError(failed)
    if ctx.tp == 1 and ctx.pp == 1:
        return selected  # every rank is its replica's tiling rank: nothing to share
    shared = (["TP peers receive its tiles"] if ctx.tp > 1 else []) + (
        ["later pipeline stages only tile counts"] if ctx.pp > 1 else [])
    description = (f"{selected.description} " if selected else "") + (
        f"on 1 rank per replica (tp {ctx.tp} x pp {ctx.pp}): {', '.join(shared)}")
    tiler = ReplicaTiler(selected.tiler if selected else None, tiling_cfg, role, ctx.tp_group, ctx.pp_group)
    return SelectedTiler(tiler, description)


def check_images_once(data_path: Union[str, Path], kind: str, ctx: "ParallelContext",
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[Path, Optional[str]]:
    """The load-time check of every image ``data_path`` names (resolved path -> reason, None
    when fine), decoded by the tiling ranks only, each taking every n-th file; every rank
    gets all verdicts (collective over the world). Pass it as ``checked`` to ``load_records``
    / ``load_pairs``, which then decode nothing, so every rank keeps the same records."""
    from .schema import referenced_images

    paths = referenced_images(data_path, kind)
    tiling = [False] * ctx.world_size
    dist.all_gather_object(tiling, tiling_role(ctx.tp_rank, ctx.pp_rank) == "tile")
    tilers = [rank for rank, tiles in enumerate(tiling) if tiles]
    bad: dict[Path, str] = {}  # only the bad ones travel: every rank knows ``paths`` already
    if ctx.rank in tilers:
        for path in paths[tilers.index(ctx.rank)::len(tilers)]:
            reason = _verdict(path, max_pixels)
            if reason is not None:
                bad[path] = reason
    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, bad)
    checked: dict[Path, Optional[str]] = dict.fromkeys(paths)
    for part in parts:
        checked.update(part)
    return checked


def _verdict(path: Path, max_pixels: int) -> Optional[str]:
    """``check_image``; an unexpected error is a verdict too, so that no rank is left waiting."""
    try:
        return check_image(path, max_pixels)
    except Exception as err:  # any: check_image turns every decoding error into a reason already
        return f"cannot be checked: {type(err).__name__}: {err}"
