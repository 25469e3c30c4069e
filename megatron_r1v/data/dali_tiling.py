"""InternVL dynamic tiling on NVIDIA DALI: the :class:`~.tiling.Tiler` interface of the PIL reference.

The grid of each image is chosen in Python with the reference's :func:`~.tiling.choose_grid`
from the image size read out of the file header (PIL ``Image.open`` parses headers only,
including the EXIF orientation), so grid and tile order are those of the reference by
construction. DALI decodes; the tiles come from one of two graphs (``cpu_kernel``):

- ``"r1v"`` (CPU, the default when it builds): the project's DALI operator
  ``r1v.internvl_tiles`` (:mod:`.dali_plugin`, ``csrc/internvl_tiles.cc``) resizes with
  Pillow's fixed-point BICUBIC, writes the row-major tiles and the thumbnail straight into
  normalized float32 ``[N, 3, S, S]`` frames, and so gives the reference's values bit for bit.
- ``"dali"`` (GPU, or CPU when the operator cannot be built): DALI's ``fn.resize`` (cubic,
  antialiased like PIL's bicubic when downscaling) to ``(S * cols, S * rows)``, row-major tiles
  by reshape + transpose on uint8, the ``S x S`` thumbnail appended, ``crop_mirror_normalize``
  to float32. Pixels then differ from the reference by the resampling implementation (float
  separable filter, border taps repeated instead of renormalized); tests/unit/test_data_tiling.py
  states the measured difference.

Outputs reach torch through DLPack without a copy (``exec_dynamic`` gives every run fresh
buffers).

Which files DALI decodes. Measured against :func:`~.images.load_rgb` (DALI 2.4, CPU), DALI's
decoder gives identical pixels for 8-bit RGB and grayscale JPEG and PNG, palette and
1-bit PNG, 16-bit grayscale PNG, and applies all eight EXIF orientations the same way. It
differs where ``load_rgb`` composites transparency over white (RGBA, LA, palette or tRNS
transparency: DALI drops alpha) and for 48-bit RGB PNG (DALI scales, PIL keeps the high
byte). Those files, every other format, CMYK JPEG (converted fine in our test, but Adobe/
YCCK variants vary), files whose end marker is missing (truncated: DALI's decoder would
fail the whole batch) and anything the header parse rejects are decoded by ``load_rgb``
instead and fed to the same tiling graph as arrays; ``load_rgb`` also
produces the canonical :class:`~.images.ImageError` for bad files. If DALI still fails on
a batch, the pipeline is rebuilt and that batch goes the ``load_rgb`` way, so bad-sample
decisions are always PIL's.

``device="gpu"`` decodes with nvJPEG/nvImageCodec (``mixed``) and resizes on the GPU with the
``"dali"`` graph; it is built the same way but has not been run on a machine with a GPU in
this repository's CI. DALI is imported lazily: the rest of ``megatron_r1v.data`` works without it.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from . import dali_plugin
from .images import ImageError, ImageSource, load_rgb, read_image_bytes
from .tiling import (
    Grid, TiledImage, TilingConfig, TilingResult, choose_grid, log_skip_summary, num_tiles_for,
    record_bad_sample,
)

logger = logging.getLogger(__name__)

_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"
# (format, mode, PIL raw mode) that DALI's decoder turns into exactly load_rgb's pixels.
_DALI_DECODES_LIKE_PIL = {
    ("JPEG", "RGB", "RGB"), ("JPEG", "L", "L"),
    ("PNG", "RGB", "RGB"), ("PNG", "L", "L"), ("PNG", "P", "P"), ("PNG", "1", "1"), ("PNG", "I;16", "I;16B"),
}
_EXIF_ORIENTATION = 0x0112
_MIN_DALI = (1, 44)


def _import_dali() -> Any:
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401  (submodules used through ``dali``)
        import nvidia.dali.types  # noqa: F401
    except ImportError as err:
        raise ImportError("DALITiler needs NVIDIA DALI: pip install 'megatron-r1v[data]' "
                          "(nvidia-dali-cuda120); the PIL reference (PILTiler) works without it") from err
    version = tuple(int(part) for part in dali.__version__.split(".")[:2] if part.isdigit())
    if version < _MIN_DALI:  # exec_dynamic with zero-copy outputs arrived in DALI 1.44
        raise ImportError(f"DALITiler needs NVIDIA DALI >= {'.'.join(map(str, _MIN_DALI))}, found {dali.__version__}")
    return dali


def pil_only_reason(image: Image.Image, data: bytes, max_pixels: int) -> Optional[str]:
    """None when DALI may decode ``data`` (opened, not decoded, as ``image``); else why load_rgb must."""
    raw_mode = image.tile[0][3] if image.tile else None
    if isinstance(raw_mode, tuple):  # JPEG: (rawmode, jpegmode)
        raw_mode = raw_mode[0]
    kind = (image.format, image.mode, raw_mode)
    if kind not in _DALI_DECODES_LIKE_PIL:
        return f"format/mode {kind}"
    if "transparency" in image.info:
        return "transparency"
    if not 0 < image.width * image.height <= max_pixels:
        return f"size {image.width}x{image.height}"  # load_rgb words the error
    if getattr(image, "is_animated", False):
        return "animated"
    if image.format == "JPEG" and not data.endswith(_JPEG_END):
        return "no JPEG end marker (truncated or trailing data)"
    if image.format == "PNG":
        if not data.endswith(_PNG_END):
            return "no PNG IEND chunk (truncated or trailing data)"
        if b"eXIf" in data and "exif" not in image.info:
            return "EXIF after the image data"  # its orientation is only known after a full decode
    orientation = _orientation(image)
    if orientation not in range(1, 9):
        return f"EXIF orientation {orientation}"
    if orientation != 1 and any(k in image.info for k in ("xmp", "XML:com.adobe.xmp")):
        return "orientation may come from XMP"  # Pillow reads XMP orientation, DALI only EXIF
    return None


def _dali_error_summary(err: Exception) -> str:
    """The operator's own message out of DALI's multi-line "Critical error in pipeline" text."""
    text = str(err)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1].split("Current pipeline object", 1)[0]
    return " ".join(text.split())[:300] or type(err).__name__


@dataclass
class _Item:
    index: int
    path: str
    """The file, or the embedded image's name (for messages)."""
    grid: Grid
    data: np.ndarray
    """Encoded file bytes (DALI decodes) or the decoded [H, W, 3] uint8 image (load_rgb did)."""
    source: ImageSource
    """What was read: a path or the EmbeddedImage (a DALI failure decodes it again with load_rgb)."""


def _orientation(image: Image.Image) -> int:
    """EXIF orientation from the header. Pillow's PNG ``getexif`` decodes the whole image when
    the header has no eXIf chunk (to look after the image data); that case is 1 here, and
    :func:`pil_only_reason` sends files with a late eXIf chunk to load_rgb."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return int(image.getexif().get(_EXIF_ORIENTATION, 1))


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    return (image.height, image.width) if _orientation(image) in (5, 6, 7, 8) else image.size


class DALITiler:
    """InternVL tiling with DALI pipelines (module docstring); same results layout as PILTiler.

    ``num_threads`` DALI worker threads; ``batch_size`` images per pipeline run. One
    pipeline decodes encoded files, a second takes images decoded by ``load_rgb``; both
    are built on first use and reused. Not thread-safe: one tiler per loader worker.

    ``cpu_kernel``: ``"auto"`` uses the ``r1v.internvl_tiles`` operator on CPU and falls back
    to DALI's own operators (with a warning naming the reason) when it cannot be built or the
    installed Pillow's pass order is unknown; ``"r1v"`` requires it (raises
    :class:`~.dali_plugin.PluginBuildError`); ``"dali"`` never uses it. ``self.cpu_kernel``
    holds the one in use (``"dali"`` on GPU).
    """

    def __init__(self, config: TilingConfig = TilingConfig(), num_threads: int = 2,
                 device: Literal["cpu", "gpu"] = "cpu", batch_size: int = 16, device_id: Optional[int] = None,
                 cpu_kernel: Literal["auto", "r1v", "dali"] = "auto"):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if cpu_kernel not in ("auto", "r1v", "dali"):
            raise ValueError(f"cpu_kernel must be 'auto', 'r1v' or 'dali', got {cpu_kernel!r}")
        if device == "gpu" and cpu_kernel == "r1v":
            raise ValueError("cpu_kernel='r1v' is a CPU operator; device='gpu' resizes with DALI's GPU operators")
        if num_threads < 1 or batch_size < 1:
            raise ValueError(f"num_threads and batch_size must be >= 1, got {num_threads}, {batch_size}")
        self.config = config
        self.num_threads = num_threads
        self.device = device
        self.batch_size = batch_size
        self.device_id = (torch.cuda.current_device() if device_id is None else device_id) if device == "gpu" else None
        self._dali = _import_dali()
        self._vertical_first_rule = False
        self.cpu_kernel = "dali" if device == "gpu" or cpu_kernel == "dali" else self._load_r1v_kernel(cpu_kernel)
        self._pipes: dict[bool, Any] = {}  # encoded? -> built pipeline

    def _load_r1v_kernel(self, requested: str) -> str:
        """"r1v" when the operator is loaded and matches the installed Pillow; else "dali" (auto) or raises."""
        try:
            dali_plugin.load()
            rule = dali_plugin.pass_order_rule()
        except dali_plugin.PluginBuildError as err:
            if requested == "r1v":
                raise
            logger.warning("DALITiler: r1v.internvl_tiles unavailable (%s); using DALI's own CPU operators, "
                           "which are slower and not bit-exact", err)
            return "dali"
        self._vertical_first_rule = rule
        return "r1v"

    # -- pipelines ---------------------------------------------------------------------
    def _pipeline(self, encoded: bool) -> Any:
        if encoded not in self._pipes:
            self._pipes[encoded] = self._build(encoded)
        return self._pipes[encoded]

    def _build(self, encoded: bool) -> Any:
        dali, cfg = self._dali, self.config
        fn, types = dali.fn, dali.types
        gpu = self.device == "gpu"
        # exec_dynamic: every run gets fresh output buffers, so outputs handed to torch through
        # DLPack stay valid after later runs (no copy out of DALI; tests check it).
        pipe = dali.pipeline.Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                                      device_id=self.device_id, prefetch_queue_depth=1, exec_dynamic=True)
        with pipe:
            if encoded:
                data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
                image = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB)
            else:
                image = fn.external_source(name="data", dtype=types.UINT8, ndim=3, layout="HWC")
                image = image.gpu() if gpu else image
            if self.cpu_kernel == "r1v":
                grid = fn.external_source(name="grid", dtype=types.INT32, ndim=1)  # [cols, rows]
                pipe.set_outputs(fn.r1v.internvl_tiles(
                    image, grid, tile_size=cfg.image_size, thumbnail=cfg.use_thumbnail,
                    vertical_first_rule=self._vertical_first_rule, lut=dali_plugin.normalization_lut(cfg)))
            else:
                pipe.set_outputs(self._dali_ops_graph(image))
        pipe.build()
        return pipe

    def _dali_ops_graph(self, image: Any) -> Any:
        """Tiles with DALI's own operators (``cpu_kernel="dali"``): ``[N(+1), 3, S, S]`` float32."""
        dali, cfg, S = self._dali, self.config, self.config.image_size
        fn, types = dali.fn, dali.types
        grid_w = fn.external_source(name="grid_w", dtype=types.FLOAT, ndim=0)
        grid_h = fn.external_source(name="grid_h", dtype=types.FLOAT, ndim=0)
        split_shape = fn.external_source(name="split_shape", dtype=types.INT64, ndim=1)  # [rows, S, cols, S, 3]
        tiles_shape = fn.external_source(name="tiles_shape", dtype=types.INT64, ndim=1)  # [rows*cols, S, S, 3]
        # Cubic with antialiasing widens the filter by the scale when downscaling, as PIL's
        # BICUBIC does; outputs stay uint8 because PIL's resized images are uint8 (and the
        # reorder below then moves a quarter of the bytes float32 would).
        resample = dict(interp_type=types.INTERP_CUBIC, antialias=True)
        grid = fn.resize(image, resize_x=grid_w, resize_y=grid_h, **resample)  # [rows*S, cols*S, 3]
        # Row-major tiles as frames: [rows, S, cols, S, 3] -> [rows, cols, S, S, 3] -> [N, S, S, 3].
        tiles = fn.transpose(fn.reshape(grid, shape=split_shape), perm=[0, 2, 1, 3, 4])
        frames = fn.reshape(tiles, shape=tiles_shape, layout="FHWC")
        if cfg.use_thumbnail:
            # Computed for every image, also one-tile ones that drop it (8% of the benchmark's):
            # the graph is static, and skipping it per sample would need DALI conditionals.
            thumb = fn.resize(image, resize_x=S, resize_y=S, **resample)
            frames = fn.cat(frames, fn.reshape(thumb, shape=[1, S, S, 3], layout="FHWC"), axis=0)
        return fn.crop_mirror_normalize(
            frames, mean=[255.0 * m for m in cfg.mean], std=[255.0 * s for s in cfg.std],
            output_layout="FCHW", dtype=types.FLOAT)  # [N(+1), 3, S, S]

    # -- per-file preparation --------------------------------------------------------
    def _prepare(self, index: int, source: ImageSource) -> _Item:
        """Reads the file (or takes the embedded bytes) and picks its grid; decodes with load_rgb
        when DALI must not (raises ImageError)."""
        cfg, reason = self.config, "unreadable"
        try:
            data = read_image_bytes(source)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    reason = pil_only_reason(image, data, cfg.max_pixels)
                    if reason is None:
                        grid = choose_grid(*_oriented_size(image), cfg)
                        return _Item(index, str(source), grid, np.frombuffer(data, dtype=np.uint8), source)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError):
            pass  # load_rgb below raises the canonical ImageError (or decodes what the probe could not)
        logger.debug("%s: decoded by PIL before DALI (%s)", source, reason)
        return self._decode_with_pil(index, source)

    def _decode_with_pil(self, index: int, source: ImageSource) -> _Item:
        """load_rgb (raises ImageError); the grid comes from the decoded, oriented image."""
        rgb = load_rgb(source, self.config.max_pixels)
        return _Item(index, str(source), choose_grid(rgb.width, rgb.height, self.config), np.asarray(rgb), source)

    # -- running ---------------------------------------------------------------------
    def _run(self, items: list[_Item], encoded: bool) -> list[TiledImage]:
        S = self.config.image_size
        pipe = self._pipeline(encoded)
        pipe.feed_input("data", [item.data for item in items])
        if self.cpu_kernel == "r1v":
            pipe.feed_input("grid", [np.array(item.grid, dtype=np.int32) for item in items])
        else:
            pipe.feed_input("grid_w", [np.float32(S * item.grid[0]) for item in items])
            pipe.feed_input("grid_h", [np.float32(S * item.grid[1]) for item in items])
            pipe.feed_input("split_shape", [np.array([r, S, c, S, 3], dtype=np.int64) for c, r in (i.grid for i in items)])
            pipe.feed_input("tiles_shape", [np.array([c * r, S, S, 3], dtype=np.int64) for c, r in (i.grid for i in items)])
        (frames,) = pipe.run()
        return [self._to_tiled(item, frames[i]) for i, item in enumerate(items)]

    def _to_tiled(self, item: _Item, frames: Any) -> TiledImage:
        """Wraps one output sample ``[F, 3, S, S]`` as a tensor of the image's tiles."""
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray  # copies on torch's current stream
            out = torch.empty(frames.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
            out = feed_ndarray(frames, out, torch.cuda.current_stream(self.device_id))
        else:
            out = torch.from_dlpack(frames)  # zero-copy: the buffer now belongs to this tensor
        n = num_tiles_for(item.grid, self.config)
        if out.shape[0] > n:  # one tile: the thumbnail frame is not part of InternVL's output
            out = out[:n].clone()
        return TiledImage(pixel_values=out, grid=item.grid, source=item.path)

    def _run_encoded(self, items: list[_Item], result: TilingResult, pending: list[_Item]) -> None:
        """Runs DALI decoding; on a DALI failure rebuilds and sends the batch through load_rgb."""
        try:
            for item, tiled in zip(items, self._run(items, encoded=True)):
                result.images[item.index] = tiled
            return
        except RuntimeError as err:
            logger.warning("DALI failed on a batch of %d files (%s, ...): %s; decoding them with PIL instead",
                           len(items), items[0].path, _dali_error_summary(err))
            self._pipes.pop(True, None)  # DALI marks a pipeline invalid after an operator error
        for item in items:
            try:
                pending.append(self._decode_with_pil(item.index, item.source))
            except ImageError as bad:
                record_bad_sample(bad, item.index, self.config, result.skipped)

    def tile_files(self, paths: Sequence[ImageSource]) -> TilingResult:
        result = TilingResult(images=[None] * len(paths))
        decoded: list[_Item] = []  # decoded by load_rgb, waiting for a full batch
        bs = self.batch_size
        for start in range(0, len(paths), bs):
            encoded: list[_Item] = []
            for index in range(start, min(start + bs, len(paths))):
                try:
                    item = self._prepare(index, paths[index])
                except ImageError as bad:
                    record_bad_sample(bad, index, self.config, result.skipped)
                    continue
                (encoded if item.data.ndim == 1 else decoded).append(item)
            if encoded:
                self._run_encoded(encoded, result, decoded)
            while len(decoded) >= bs:
                batch, decoded = decoded[:bs], decoded[bs:]
                for item, tiled in zip(batch, self._run(batch, encoded=False)):
                    result.images[item.index] = tiled
        if decoded:
            for item, tiled in zip(decoded, self._run(decoded, encoded=False)):
                result.images[item.index] = tiled
        result.skipped.sort(key=lambda s: s.index)  # batches that failed in DALI are judged last
        log_skip_summary(result, "DALI")
        return result
