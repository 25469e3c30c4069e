"""images.load_rgb: every odd mode converted to the exact RGB a viewer shows, every bad file a clear error."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_r1v.data.images import EmbeddedImage, ImageError, check_image, load_rgb, read_image_bytes, to_rgb

WHITE = (255, 255, 255)


def rgb_of(path: Path) -> np.ndarray:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def noise_png(path: Path, h: int = 64, w: int = 64) -> bytes:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


# --- bad files: the message names the file and the reason ---------------------------------
def expect_error(path: Path, reason: str, **kwargs) -> None:
    with pytest.raises(ImageError) as info:
        load_rgb(path, **kwargs)
    assert info.value.path == str(path)
    assert re.fullmatch(reason, info.value.reason), info.value.reason
    assert str(info.value) == f"{path}: {info.value.reason}"
    assert check_image(path, **kwargs) == info.value.reason


def test_truncated_png(tmp_path):
    data = noise_png(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "cut.png", "cannot decode image: image file is truncated")
    (tmp_path / "header_only.png").write_bytes(data[:40])  # IHDR cut short: no format recognizes it
    expect_error(tmp_path / "header_only.png", re.escape("not an image PIL can identify (corrupt or unsupported format)"))


def test_truncated_jpeg(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "cut.jpg", r"cannot decode image: image file is truncated \(\d+ bytes not processed\)")
    (tmp_path / "header_only.jpg").write_bytes(data[:100])
    expect_error(tmp_path / "header_only.jpg", "cannot decode image: Truncated File Read")


def test_corrupt_bytes(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    expect_error(tmp_path / "garbage.png", re.escape("not an image PIL can identify (corrupt or unsupported format)"))
    # A structurally valid PNG (chunk CRCs fixed up) whose compressed pixel data is damaged.
    png = noise_png(tmp_path / "ok.png")
    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[start:start + 4])
    body = bytearray(png[start + 8:start + 8 + length])
    body[100:140] = bytes(40)
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + body) & 0xFFFFFFFF)
    (tmp_path / "bad_idat.png").write_bytes(png[:start + 8] + bytes(body) + crc + png[start + 12 + length:])
    expect_error(tmp_path / "bad_idat.png", "cannot decode image: broken data stream when reading image file")


def test_not_an_image_missing_empty_and_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("a caption, not an image\n")
    expect_error(tmp_path / "notes.txt", re.escape("not an image PIL can identify (corrupt or unsupported format)"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    expect_error(tmp_path / "empty.jpg", re.escape("not an image PIL can identify (corrupt or unsupported format)"))
    expect_error(tmp_path / "missing.png", "no such file")
    expect_error(tmp_path, "not a regular file")


def test_too_many_pixels(tmp_path):
    noise_png(tmp_path / "a.png", h=30, w=40)
    expect_error(tmp_path / "a.png", "40x30 pixels exceed the limit of 1000", max_pixels=1000)
    assert check_image(tmp_path / "a.png", max_pixels=1200) is None


# --- sizes -------------------------------------------------------------------------------
def test_one_pixel(tmp_path):
    Image.new("RGB", (1, 1), (200, 10, 40)).save(tmp_path / "dot.png")
    assert rgb_of(tmp_path / "dot.png").tolist() == [[[200, 10, 40]]]


def test_extreme_aspect_ratio(tmp_path):
    row = (np.arange(10000) % 256).astype(np.uint8)
    pixels = np.stack([np.tile(row, (10, 1)), np.full((10, 10000), 7, np.uint8), np.tile(row[::-1], (10, 1))], -1)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = rgb_of(tmp_path / "wide.png")
    assert out.shape == (10, 10000, 3) and np.array_equal(out, pixels)
    Image.fromarray(pixels.transpose(1, 0, 2)).save(tmp_path / "tall.png")
    assert rgb_of(tmp_path / "tall.png").shape == (10000, 10, 3)


# --- modes -------------------------------------------------------------------------------
def test_grayscale_and_one_bit(tmp_path):
    Image.fromarray(np.array([[0, 77, 255]], np.uint8)).save(tmp_path / "gray.png")
    assert rgb_of(tmp_path / "gray.png").tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]
    Image.fromarray(np.array([[True, False, True]])).save(tmp_path / "bits.png")
    with Image.open(tmp_path / "bits.png") as image:
        assert image.mode == "1"
    assert rgb_of(tmp_path / "bits.png").tolist() == [[[255] * 3, [0] * 3, [255] * 3]]


def test_rgba_and_la_transparency_becomes_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [10, 20, 30, 255], [0, 0, 0, 128], [200, 100, 0, 0]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    # Over white: transparent -> white whatever its colour; opaque unchanged;
    # black at alpha 128 -> 255 * (1 - 128/255) = 127.
    assert rgb_of(tmp_path / "rgba.png").tolist() == [[list(WHITE), [10, 20, 30], [127, 127, 127], list(WHITE)]]
    Image.fromarray(np.array([[[0, 0], [90, 255]]], np.uint8), mode="LA").save(tmp_path / "la.png")
    assert rgb_of(tmp_path / "la.png").tolist() == [[list(WHITE), [90, 90, 90]]]


def palette_image(indices: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 250] + [0] * (256 * 3 - 9))
    return image


def test_palette_with_and_without_transparency(tmp_path):
    indices = np.array([[0, 1, 2, 1]])
    palette_image(indices).save(tmp_path / "p.png")
    assert rgb_of(tmp_path / "p.png").tolist() == [[[255, 0, 0], [0, 128, 0], [10, 20, 250], [0, 128, 0]]]
    palette_image(indices).save(tmp_path / "p_trns.png", transparency=1)  # index 1 transparent
    assert rgb_of(tmp_path / "p_trns.png").tolist() == [[[255, 0, 0], list(WHITE), [10, 20, 250], list(WHITE)]]


def test_trns_colour_key_on_rgb_and_gray(tmp_path):
    # A tRNS chunk makes one colour transparent in RGB/L PNGs too (to_rgb's rule, fixed with this test).
    Image.fromarray(np.array([[[10, 20, 30], [200, 100, 50]]], np.uint8)).save(tmp_path / "rgb.png", transparency=(10, 20, 30))
    assert rgb_of(tmp_path / "rgb.png").tolist() == [[list(WHITE), [200, 100, 50]]]
    Image.fromarray(np.array([[10, 90]], np.uint8)).save(tmp_path / "l.png", transparency=10)
    assert rgb_of(tmp_path / "l.png").tolist() == [[list(WHITE), [90, 90, 90]]]


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((16, 48, 4), np.uint8)  # three solid 16x16 blocks
    cmyk[:, 16:32, 0] = 255  # pure cyan
    cmyk[:, 32:, 3] = 128  # half black
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as image:
        assert image.mode == "CMYK"
    out = rgb_of(tmp_path / "cmyk.jpg").astype(int)
    # Solid 16x16 blocks survive JPEG almost exactly: within 2 levels of paper white, cyan, grey 127.
    for block, expected in enumerate([WHITE, (0, 255, 255), (127, 127, 127)]):
        assert np.abs(out[:, 16 * block:16 * (block + 1)] - np.array(expected)).max() <= 2, (block, out[8, 16 * block + 8])


def test_sixteen_bit_png_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as image:
        assert image.mode == "I;16"
    # round(v / 65535 * 255): 1000 -> 3.89 -> 4, 32768 -> 127.5 -> 128 (clipping would give 255s)
    assert rgb_of(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    # 32-bit integer images scale by their maximum (at least 255)
    assert np.asarray(to_rgb(Image.fromarray(np.array([[0, 1000, 2000]], np.int32))))[0, :, 1].tolist() == [0, 128, 255]


@pytest.mark.parametrize("orientation, top_left, bottom_right, size", [
    (1, "red", "blue", (64, 32)),
    (3, "blue", "red", (64, 32)),  # rotated 180
    (6, "red", "blue", (32, 64)),  # shown rotated 90 clockwise: the left half is on top
    (8, "blue", "red", (32, 64)),  # rotated 90 counter-clockwise: the left half at the bottom
])
def test_exif_orientation_applied(tmp_path, orientation, top_left, bottom_right, size):
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32], pixels[:, 32:] = colors["red"], colors["blue"]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    image = load_rgb(tmp_path / "photo.jpg")
    assert image.size == size
    out = np.asarray(image).astype(int)
    w, h = size
    # Block centres, away from the chroma-subsampled boundary: within JPEG's error of the colour.
    assert np.abs(out[h // 4, w // 4] - colors[top_left]).max() <= 6
    assert np.abs(out[3 * h // 4, 3 * w // 4] - colors[bottom_right]).max() <= 6


# --- embedded images: the same decoding from bytes in memory -------------------------------
@pytest.mark.parametrize("name, orientation", [("noise.png", 1), ("photo.jpg", 1), ("rgba.png", 1), ("exif6.jpg", 6)])
def test_embedded_bytes_decode_like_their_file(tmp_path, name, orientation):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (30, 50, 4 if name.startswith("rgba") else 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / name, exif=exif)
    blob = EmbeddedImage(f"bench.parquet:row 3:{name}", (tmp_path / name).read_bytes())
    assert read_image_bytes(blob) is blob.data and read_image_bytes(tmp_path / name) == blob.data
    from_bytes = np.asarray(load_rgb(blob))
    assert np.array_equal(from_bytes, rgb_of(tmp_path / name)) and check_image(blob) is None
    assert from_bytes.shape == ((50, 30, 3) if orientation == 6 else (30, 50, 3))
    assert str(blob) == blob.name and "data" not in repr(blob)  # messages and logs never print the bytes


def test_embedded_bad_bytes_are_named_by_the_image_name(tmp_path):
    data = noise_png(tmp_path / "ok.png")
    cases = [(data[: len(data) // 2], "cannot decode image: image file is truncated"),
             (b"a caption, not an image\n", "not an image PIL can identify (corrupt or unsupported format)"),
             (b"", "not an image PIL can identify (corrupt or unsupported format)")]
    for row, (blob_data, reason) in enumerate(cases):
        blob = EmbeddedImage(f"bench.parquet:row {row}:image", blob_data)
        with pytest.raises(ImageError) as info:
            load_rgb(blob)
        assert (info.value.path, info.value.reason, str(info.value)) == (blob.name, reason, f"{blob.name}: {reason}")
        assert check_image(blob) == reason
    big = EmbeddedImage("bench.parquet:row 9:image", data)  # 64x64
    with pytest.raises(ImageError, match=r"^bench\.parquet:row 9:image: 64x64 pixels exceed the limit of 100$"):
        load_rgb(big, max_pixels=100)
    with pytest.raises(ImageError, match="missing.png: no such file"):
        read_image_bytes(tmp_path / "missing.png")
