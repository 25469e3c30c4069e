"""InternVL dynamic tiling: the grid rule, the PIL reference backend and the bad-sample policy.

InternVL-chat (and Skywork-R1V, which reuses its preprocessing) turns one image into
``cols x rows`` tiles of ``image_size`` pixels plus a thumbnail:

1. Candidate grids are all ``(i, j)`` with ``min_num <= i * j <= max_num``, built as a set
   and sorted by area (:func:`candidate_grids`).
2. The grid whose aspect ratio ``i / j`` is closest to ``width / height`` wins; the first
   one found keeps an exact tie unless the image area exceeds half the tiled area
   (``area > 0.5 * image_size**2 * i * j``), so a large image moves on to the bigger grid
   of the same ratio (:func:`choose_grid`).
3. The image is resized to ``(image_size * cols, image_size * rows)`` with PIL's default
   ``Image.resize`` filter (InternVL passes none), which is BICUBIC for RGB images since
   Pillow 7.0, then cut into row-major ``image_size`` squares.
4. When ``use_thumbnail`` and there is more than one tile, the whole image resized to
   ``image_size x image_size`` (again bicubic) is appended.
5. Every tile goes through ``Resize((448, 448), BICUBIC)`` (a copy: the size already
   matches), ``ToTensor`` (``uint8 / 255`` in float32) and ``Normalize(mean, std)``
   (``(x - mean) / std``), giving float32 ``[N, 3, S, S]``.

:func:`tile_image` performs exactly these operations with PIL and torch (the same float32
operations torchvision runs, so its output is bit-identical to InternVL's ``load_image``
for an RGB input). The DALI backend lives in :mod:`megatron_r1v.data.dali_tiling`.

Bad files (truncated, corrupt, not an image, too large; see :mod:`.images`) follow
``TilingConfig.on_bad_sample``: ``"error"`` raises :class:`~.images.ImageError` naming the
file; ``"skip"`` drops the file from the result, records ``(index, path, reason)`` in
:attr:`TilingResult.skipped` and logs a warning naming it, never silently.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, ImageError, ImageSource, load_rgb

logger = logging.getLogger(__name__)

BadSamplePolicy = Literal["error", "skip"]
Grid = tuple[int, int]
"""(cols, rows): tiles across and down, InternVL's ``target_aspect_ratio``."""
PathLike = Union[str, Path]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TilingConfig:
    image_size: int = 448
    """Side of one square tile in pixels (InternVL's ``force_image_size``)."""
    max_tiles: int = 12
    """Largest number of grid tiles, thumbnail not counted (``max_dynamic_patch``)."""
    min_tiles: int = 1
    """Smallest number of grid tiles (``min_dynamic_patch``)."""
    use_thumbnail: bool = True
    """Append the whole image as one more tile when the grid has more than one tile."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after scaling pixels to [0, 1] (RGB order)."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided by after the mean (RGB order)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are rejected as bad samples (decompression-bomb guard)."""
    on_bad_sample: BadSamplePolicy = "error"
    """``error``: raise ImageError naming the file; ``skip``: drop it, count it and log it."""

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.min_tiles < 1:
            raise ValueError(f"min_tiles must be >= 1, got {self.min_tiles}")
        if self.max_tiles < self.min_tiles:
            raise ValueError(f"max_tiles ({self.max_tiles}) must be >= min_tiles ({self.min_tiles})")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std!r}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")


def candidate_grids(cfg: TilingConfig) -> list[Grid]:
    """InternVL's ``target_ratios``: every (i, j) with min <= i*j <= max, sorted by area.

    Built, like InternVL's, as a set and then stably sorted by area, so grids of equal area
    come in the same (CPython set) order; that order decides exact ties between two grids
    of equal area and equal distance to the image's aspect ratio.
    """
    lo, hi = cfg.min_tiles, cfg.max_tiles
    grids = {(i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1) if lo <= i * j <= hi}
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, cfg: TilingConfig) -> Grid:
    """InternVL's ``find_closest_aspect_ratio``: the (cols, rows) grid for a width x height image.

    A strictly smaller ``|width/height - cols/rows|`` wins; on an exact tie the later (larger
    or equal area) grid replaces the best only when the image has more than half as many
    pixels as that grid would hold (``width * height > 0.5 * image_size**2 * cols * rows``).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best: Grid = (1, 1)  # InternVL's initial value; always replaced since a diff is finite
    best_diff = float("inf")
    for cols, rows in candidate_grids(cfg):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * cfg.image_size * cfg.image_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles_for(grid: Grid, cfg: TilingConfig) -> int:
    """Tiles produced for ``grid``: cols*rows, plus the thumbnail when there is more than one."""
    n = grid[0] * grid[1]
    return n + 1 if cfg.use_thumbnail and n > 1 else n


@dataclass
class TiledImage:
    """One image after tiling."""

    pixel_values: torch.Tensor
    """float32 [num_tiles, 3, S, S]: grid tiles row-major, then the thumbnail (if any)."""
    grid: Grid
    """(cols, rows) chosen by :func:`choose_grid`."""
    source: Optional[str] = None
    """File the image came from (None for in-memory images)."""

    @property
    def num_tiles(self) -> int:
        """Tiles including the thumbnail (the number of <img> blocks of 256 tokens)."""
        return int(self.pixel_values.shape[0])


@dataclass(frozen=True)
class SkippedImage:
    index: int
    """Position of the file in the input list."""
    path: str
    reason: str


@dataclass
class TilingResult:
    """Output of ``Tiler.tile_files``: ``images[i]`` belongs to ``paths[i]``; None means skipped."""

    images: list[Optional[TiledImage]]
    skipped: list[SkippedImage] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def kept(self) -> list[TiledImage]:
        """The tiled images in input order, skipped ones left out."""
        return [image for image in self.images if image is not None]


class Tiler(Protocol):
    """A tiling backend: the PIL reference (:class:`PILTiler`) or DALI (``DALITiler``)."""

    config: TilingConfig

    def tile_files(self, paths: Sequence[ImageSource]) -> TilingResult:
        """Tiles every file (or embedded image); bad files follow ``config.on_bad_sample``."""
        ...


def record_bad_sample(error: ImageError, index: int, cfg: TilingConfig, skipped: list[SkippedImage]) -> None:
    """Applies the bad-sample policy: re-raises under ``error``; records and logs under ``skip``."""
    if cfg.on_bad_sample == "error":
        raise error
    skipped.append(SkippedImage(index=index, path=error.path, reason=error.reason))
    logger.warning("on_bad_sample=skip: skipping image #%d %s: %s", index, error.path, error.reason)


def log_skip_summary(result: TilingResult, backend: str) -> None:
    """One summary line per call, so skips show up even when per-file warnings scroll by."""
    if result.skipped:
        logger.warning("%s tiling skipped %d of %d images (on_bad_sample=skip): %s", backend, result.num_skipped,
                       len(result.images), ", ".join(s.path for s in result.skipped))


def normalize_into(out_NCSS: torch.Tensor, cfg: TilingConfig) -> torch.Tensor:
    """In place, ``out`` holding 0..255 values: torchvision's ToTensor (/255) then Normalize.

    The same float32 operations in the same order as torchvision, so the result is
    bit-identical to InternVL's ``build_transform`` output.
    """
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
    return out_NCSS.div_(255.0).sub_(mean).div_(std)


def tile_image(image: Image.Image, cfg: TilingConfig, source: Optional[str] = None) -> TiledImage:
    """InternVL's ``dynamic_preprocess`` + ``build_transform`` for one RGB PIL image (module docstring).

    Crops are read straight out of the resized image as strided views instead of PIL
    ``crop`` copies; the values are the same.
    """
    if image.mode != "RGB":
        raise ValueError(f"tile_image needs an RGB image (use images.to_rgb), got mode {image.mode}")
    S = cfg.image_size
    cols, rows = choose_grid(image.width, image.height, cfg)
    n_grid = cols * rows
    n_total = num_tiles_for((cols, rows), cfg)
    out = torch.empty(n_total, 3, S, S, dtype=torch.float32)  # [N, 3, S, S]
    out_np = out.numpy()  # same memory; numpy reads PIL's read-only arrays, torch.from_numpy warns on them
    grid_HWC = np.asarray(image.resize((S * cols, S * rows), Image.Resampling.BICUBIC))  # [rows*S, cols*S, 3]
    # [rows*S, cols*S, 3] -> [rows, cols, 3, S, S]: tile (r, c) is rows r*S.., columns c*S..
    np.copyto(out_np[:n_grid].reshape(rows, cols, 3, S, S), grid_HWC.reshape(rows, S, cols, S, 3).transpose(0, 2, 4, 1, 3))
    if n_total > n_grid:
        thumb_HWC = np.asarray(image.resize((S, S), Image.Resampling.BICUBIC))  # [S, S, 3]
        np.copyto(out_np[n_grid], thumb_HWC.transpose(2, 0, 1))
    return TiledImage(pixel_values=normalize_into(out, cfg), grid=(cols, rows), source=source)


def tile_file(path: ImageSource, cfg: TilingConfig) -> TiledImage:
    """Loads ``path`` (a file or an ``EmbeddedImage``) with :func:`.images.load_rgb` (raises ImageError) and tiles it."""
    return tile_image(load_rgb(path, cfg.max_pixels), cfg, source=str(path))


class PILTiler:
    """The reference backend: PIL decode/resize and torch normalization, in ``num_threads`` threads.

    Threads (not processes) parallelize it: PIL releases the GIL while decoding and
    resampling, torch while normalizing, and the result tensors need no pickling.
    """

    def __init__(self, config: TilingConfig = TilingConfig(), num_threads: int = 1):
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.config = config
        self.num_threads = num_threads

    def _tile_one(self, path: ImageSource) -> Union[TiledImage, ImageError]:
        try:
            return tile_file(path, self.config)
        except ImageError as err:
            return err  # the policy is applied in input order by the caller

    def tile_files(self, paths: Sequence[ImageSource]) -> TilingResult:
        if self.num_threads == 1:
            outcomes = [self._tile_one(p) for p in paths]
        else:
            with ThreadPoolExecutor(self.num_threads, thread_name_prefix="pil-tiler") as pool:
                outcomes = list(pool.map(self._tile_one, paths))
        result = TilingResult(images=[None] * len(paths))
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, ImageError):
                record_bad_sample(outcome, index, self.config, result.skipped)
            else:
                result.images[index] = outcome
        log_skip_summary(result, "PIL")
        return result
