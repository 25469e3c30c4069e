"""What a reward model r_theta judges, and how it travels over HTTP.

A :class:`RewardItem` is one (prompt, response, images) triple: the question as the policy
saw it (``<image>`` placeholders included), the completion being judged, and the images
the question refers to. Every scorer (:class:`RewardScorer`: the HTTP client, the
in-process text and vision-language models) takes a sequence of items and returns one
float per item, in order.

JSON body of ``POST /score`` (``tools/serve_reward_model.py``; UTF-8):

    {"items": [{"prompt": str, "response": str, "images": [IMAGE, ...]}, ...]}
    {"texts": [str, ...]}                          (text-only models only: the old form)

``images`` may be left out (no image). An IMAGE string is one of

* an absolute file path on a filesystem the server shares (``/data/img/0001.png``);
* a data URL ``data:image/png;base64,<payload>``;
* bare base64 of the image file's bytes.

Relative paths are refused: the server's working directory is not the client's. A bad
request is a :class:`RequestError` whose message names the field (``items[2].images[0]``),
which the server answers with HTTP 400. :func:`parse_score_body` holds every rule, so the
server and the tests read them in one place.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import mimetypes
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, Protocol, Sequence, Union

from megatron_r1v.data.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb, to_rgb

if TYPE_CHECKING:
    from PIL import Image

ImageSource = Union[str, "os.PathLike[str]", "Image.Image"]
"""A file path, or an already decoded PIL image (in-process scorers and the server)."""
ImageTransport = Literal["path", "base64"]
IMAGE_TRANSPORTS: tuple[str, ...] = ("path", "base64")
ITEM_FIELDS = ("prompt", "response", "images")


@dataclass(frozen=True)
class RewardItem:
    """One response to judge, with the question and the images it answers."""

    prompt: str
    """The question as the policy saw it; ``<image>`` placeholders mark where the images go."""
    response: str
    """The completion being judged (it may start inside the thought)."""
    images: tuple[ImageSource, ...] = ()
    """In the order of the question's placeholders (or, without placeholders, before its text)."""

    @property
    def text(self) -> str:
        """What a text-only model reads: the prompt, a blank line, the response (no image)."""
        return f"{self.prompt}\n\n{self.response}"


class RewardScorer(Protocol):
    """Anything that scores items: the HTTP client or an in-process model."""

    def score(self, items: Sequence[RewardItem]) -> list[float]:
        """One scalar reward per item, in order."""
        ...


class RequestError(ValueError):
    """A /score body that breaks the contract; the message names the field (HTTP 400)."""


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold (server flags ``--max-items``, ``--max-images``)."""

    max_items: int
    max_images: int = 16
    """Per item."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Per image, checked before decoding (decompression-bomb guard, as for training data)."""


@dataclass(frozen=True)
class ScoreRequest:
    """A parsed body: exactly one of ``texts`` (old form) and ``items`` is set."""

    texts: Optional[list[str]] = None
    items: Optional[list[RewardItem]] = None


# --- client side: items to JSON ------------------------------------------------------------


def encode_image(source: ImageSource, where: str, transport: ImageTransport) -> str:
    """The IMAGE string for ``source``: its absolute path, or its bytes as a data URL.

    A PIL image has no path, so it always travels as PNG base64. Raises FileNotFoundError
    naming ``where`` when a file sent as base64 cannot be read here.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{where} is {type(source).__name__}; expected a file path or a PIL image")
    path = os.path.abspath(os.fspath(source))  # the server's working directory is not ours
    if transport == "path":
        return path
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise FileNotFoundError(f"{where}: cannot read {path} to send it as base64: {err.strerror or err}") from None
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"  # informative only: the server sniffs
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def item_to_json(item: RewardItem, index: int, transport: ImageTransport) -> dict:
    """``items[index]`` of a /score body."""
    if not isinstance(item, RewardItem):
        raise TypeError(f"items[{index}] is {type(item).__name__}, expected RewardItem")
    for name in ("prompt", "response"):
        if not isinstance(getattr(item, name), str):
            raise TypeError(f"items[{index}].{name} is {type(getattr(item, name)).__name__}, expected str")
    images = [encode_image(src, f"items[{index}].images[{j}]", transport) for j, src in enumerate(item.images)]
    return {"prompt": item.prompt, "response": item.response, "images": images}


# --- server side: JSON to items --------------------------------------------------------------


def decode_image(value: str, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> "Image.Image":
    """An IMAGE string (module docstring) as an RGB PIL image; RequestError naming ``where``."""
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(f"{where}: a data URL must look like data:<mime>;base64,<payload>")
        return _decode_base64(payload, where, max_pixels)
    if os.path.isabs(value):
        try:
            return load_rgb(value, max_pixels)
        except ImageError as err:
            raise RequestError(f"{where}: {err}") from None
    return _decode_base64(value, where, max_pixels, hint=True)


def _decode_base64(payload: str, where: str, max_pixels: int, hint: bool = False) -> "Image.Image":
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        if not hint:
            raise RequestError(f"{where}: the data URL's payload is not valid base64") from None
        raise RequestError(f"{where}: neither an absolute file path nor valid base64 (relative paths are refused: "
                           "send an absolute path on a filesystem the server shares)") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.width, image.height
            if size[0] * size[1] <= max_pixels:
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except UnidentifiedImageError:
        raise RequestError(f"{where}: base64 data of {len(data)} bytes is not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RequestError(f"{where}: cannot decode the base64 image: {err}") from None
    raise RequestError(f"{where}: {size[0]}x{size[1]} pixels exceed the limit of {max_pixels}")


def open_image(source: ImageSource, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> "Image.Image":
    """An RGB PIL image from what an in-process scorer was given (a path or a PIL image)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else to_rgb(source)
    if isinstance(source, str) and source.startswith("data:"):
        return decode_image(source, where, max_pixels)
    try:
        return load_rgb(os.fspath(source), max_pixels)
    except ImageError as err:
        raise RequestError(f"{where}: {err}") from None


def parse_score_body(body: bytes, limits: RequestLimits, decode_images: bool) -> ScoreRequest:
    """The request in a /score body, or RequestError naming what is wrong.

    ``decode_images=False`` (a text-only model, which never sees them) still checks that
    every image is a string but does not open it.
    """
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise RequestError(f"body is not valid JSON: {err}") from None
    if not isinstance(payload, dict) or ("items" in payload) == ("texts" in payload):
        raise RequestError('body must be a JSON object {"items": [{"prompt", "response", "images"}, ...]} '
                           'or {"texts": [str, ...]}')
    form = "items" if "items" in payload else "texts"
    entries = payload[form]
    if not isinstance(entries, list):
        raise RequestError(f'"{form}" must be a list, got {type(entries).__name__}')
    if len(entries) > limits.max_items:
        raise RequestError(f"{len(entries)} {form} in one request; this server takes at most {limits.max_items} "
                           "(lower the client's batch size, reward.model_batch_size, or restart with --max-items)")
    if form == "texts":
        for i, text in enumerate(entries):
            if not isinstance(text, str):
                raise RequestError(f'"texts"[{i}] must be a string, got {type(text).__name__}')
        return ScoreRequest(texts=entries)
    return ScoreRequest(items=[_parse_item(entry, i, limits, decode_images) for i, entry in enumerate(entries)])


def _parse_item(entry: Any, i: int, limits: RequestLimits, decode_images: bool) -> RewardItem:
    if not isinstance(entry, dict):
        raise RequestError(f"items[{i}] must be an object with prompt, response and images, "
                           f"got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(ITEM_FIELDS))
    if unknown:
        raise RequestError(f"items[{i}] has unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"the fields are {', '.join(ITEM_FIELDS)}")
    for name in ("prompt", "response"):
        if name not in entry:
            raise RequestError(f"items[{i}].{name} is missing")
        if not isinstance(entry[name], str):
            raise RequestError(f"items[{i}].{name} must be a string, got {type(entry[name]).__name__}")
    images = entry.get("images", [])
    if not isinstance(images, list):
        raise RequestError(f"items[{i}].images must be a list of strings, got {type(images).__name__}")
    if len(images) > limits.max_images:
        raise RequestError(f"items[{i}].images holds {len(images)} images; this server takes at most "
                           f"{limits.max_images} per item (--max-images)")
    for j, image in enumerate(images):
        if not isinstance(image, str):
            raise RequestError(f"items[{i}].images[{j}] must be a string (a path or base64), "
                               f"got {type(image).__name__}")
    if decode_images:
        images = [decode_image(image, f"items[{i}].images[{j}]", limits.max_pixels) for j, image in enumerate(images)]
    return RewardItem(entry["prompt"], entry["response"], tuple(images))
