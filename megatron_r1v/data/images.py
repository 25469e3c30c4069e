"""Image files to 8-bit RGB, or a clear error naming the file.

Every mode PIL decodes is converted to what a viewer would show: grayscale and 1-bit
are replicated to RGB, alpha (RGBA, LA, palette transparency, a PNG tRNS colour key on
1-bit/L/RGB) is composited over white (dropping it, as a bare ``convert("RGB")`` does,
exposes whatever colour the transparent pixels happen to hold), CMYK goes through PIL's
conversion, 16-bit and 32-bit integer images are scaled (not clipped) to 8 bits, and the
EXIF orientation is applied.
Truncated or corrupt files, files that are not images, and images beyond
``max_pixels`` raise :class:`ImageError`.

An image is a file path or an :class:`EmbeddedImage`: encoded bytes held in memory (a
benchmark's parquet cell), named for messages (``FILE:row N:COLUMN``). Both are decoded by
the same code, so embedded images need no temporary files.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 12 tiles of 448 x 448 need ~2.4M pixels; 100M pixels is a 10k x 10k scan, far beyond.
DEFAULT_MAX_PIXELS = 100_000_000
_WIDE_INTEGER_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": None}


@dataclass(frozen=True)
class EmbeddedImage:
    """An encoded image (PNG, JPEG, ...) held in memory instead of a file."""

    name: str
    """Where it came from, for messages: ``FILE:row N:COLUMN``."""
    data: bytes = field(repr=False)

    def __str__(self) -> str:
        return self.name


ImageSource = Union[str, "os.PathLike[str]", EmbeddedImage]
"""What the tilers and :func:`load_rgb` take: a file path or an :class:`EmbeddedImage`."""


def _existing_file(source: Union[str, "os.PathLike[str]"]) -> Path:
    path = Path(source)
    if not path.is_file():
        raise ImageError(path, "no such file" if not path.exists() else "not a regular file")
    return path


def read_image_bytes(source: ImageSource) -> bytes:
    """The encoded bytes of a file or an embedded image; ImageError when a file cannot be read."""
    if isinstance(source, EmbeddedImage):
        return source.data
    path = _existing_file(source)
    try:
        return path.read_bytes()
    except OSError as err:
        raise ImageError(path, f"cannot read: {err.strerror or err}") from None


class ImageError(ValueError):
    """An image that cannot be used; the message names the file (or the embedded image) and the reason."""

    def __init__(self, path: Union[str, Path, EmbeddedImage], reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _integer_to_l(image: Image.Image, full_scale: Optional[float]) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if full_scale is None:  # 32-bit "I": scale by what the pixels reach (at least 8 bits)
        full_scale = max(float(values.max()), 255.0)
    return Image.fromarray(np.clip(np.rint(values / full_scale * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of any PIL image (module docstring has the rules)."""
    if image.mode in _WIDE_INTEGER_MODES:
        image = _integer_to_l(image, _WIDE_INTEGER_MODES[image.mode])
    elif image.mode == "F":
        image = _integer_to_l(image, 1.0 if float(np.asarray(image).max()) <= 1.0 else None)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("1", "L", "RGB") and image.info.get("transparency") is not None:
        # A PNG tRNS colour key is transparency too; convert("RGB") alone would ignore it.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes a file or an embedded image fully (so truncation is caught here, not in a
    worker) to RGB."""
    path: Union[Path, EmbeddedImage] = source if isinstance(source, EmbeddedImage) else _existing_file(source)
    opened = io.BytesIO(path.data) if isinstance(path, EmbeddedImage) else path
    try:
        # max_pixels is our limit, checked before decoding. PIL's own bomb check only
        # warns below 2 x Image.MAX_IMAGE_PIXELS; that warning is left alone (turning it
        # into an error needs warnings.catch_warnings, which is not thread-safe).
        with Image.open(opened) as image:
            if image.width * image.height > max_pixels:
                raise ImageError(path, f"{image.width}x{image.height} pixels exceed the limit of {max_pixels}")
            if image.width < 1 or image.height < 1:
                raise ImageError(path, f"empty image ({image.width}x{image.height})")
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image PIL can identify (corrupt or unsupported format)") from None
    except Image.DecompressionBombError as err:
        raise ImageError(path, f"too many pixels: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        # PIL reports truncated data ("image file is truncated") and bad chunks as OSError.
        raise ImageError(path, f"cannot decode image: {err}") from None


def check_image(path: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[str]:
    """None when ``path`` decodes to a usable image, else the reason (for validators)."""
    try:
        load_rgb(path, max_pixels)
    except ImageError as err:
        return err.reason
    return None
