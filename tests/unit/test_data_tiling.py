"""InternVL dynamic tiling: grid rule, tile order, thumbnail, normalization, PIL vs DALI, bad samples."""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tool_modules import load_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.data import dali_tiling
from megatron_r1v.data.images import EmbeddedImage, ImageError
from megatron_r1v.data.tiling import (
    PILTiler, TilingConfig, candidate_grids, choose_grid, tile_file, tile_image,
)

S = 448
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
REPO = Path(__file__).resolve().parents[2]


# --- InternVL's rules restated independently (from InternVL-chat's dynamic_preprocess) ---------
def internvl_target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    ratios = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    ratios.add((i, j))
    return sorted(ratios, key=lambda r: r[0] * r[1])


def internvl_closest(width: int, height: int, min_num: int = 1, max_num: int = 12, size: int = S):
    best_diff, best = float("inf"), (1, 1)
    for ratio in internvl_target_ratios(min_num, max_num):
        diff = abs(width / height - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * size * size * ratio[0] * ratio[1]:
            best = ratio
    return best


def internvl_literal(image: Image.Image) -> torch.Tensor:
    """Per-tile PIL crops, then torchvision's Resize/ToTensor/Normalize restated with torch ops."""
    cols, rows = internvl_closest(*image.size)
    resized = image.resize((S * cols, S * rows))  # InternVL passes no filter: PIL's default
    crops = []
    for i in range(cols * rows):
        box = ((i % cols) * S, (i // cols) * S, (i % cols + 1) * S, (i // cols + 1) * S)
        crops.append(resized.crop(box))
    if cols * rows > 1:
        crops.append(image.resize((S, S)))
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    out = []
    for crop in crops:
        crop = crop.resize((S, S), Image.Resampling.BICUBIC)  # T.Resize on a 448x448 tile: a copy
        x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # ToTensor
        out.append(x.sub(mean).div(std))  # Normalize
    return torch.stack(out)


def normalized(rgb) -> torch.Tensor:
    """[3] float32: ToTensor then Normalize of one RGB triple, in torchvision's op order."""
    return torch.tensor(rgb, dtype=torch.uint8).to(torch.float32).div(255).sub(torch.tensor(MEAN)).div(torch.tensor(STD))


# --- grid rule -------------------------------------------------------------------------------
def test_candidate_grids_match_internvl():
    for lo, hi in [(1, 12), (1, 6), (2, 2), (3, 9)]:
        assert candidate_grids(TilingConfig(min_tiles=lo, max_tiles=hi)) == internvl_target_ratios(lo, hi)
    grids = candidate_grids(TilingConfig())
    assert len(grids) == 35 and grids[0] == (1, 1) and set(grids[-2:]) <= {(12, 1), (1, 12), (2, 6), (6, 2), (3, 4), (4, 3)}
    assert all(a[0] * a[1] <= b[0] * b[1] for a, b in zip(grids, grids[1:]))


@pytest.mark.parametrize("size, expected", [
    ((1, 1), (1, 1)), ((10000, 10), (12, 1)), ((10, 10000), (1, 12)),
    # Exact 2:1 tie between (2,1) and (4,2): the larger grid needs area > 0.5*448^2*8 = 802816.
    ((896, 448), (2, 1)), ((1266, 633), (2, 1)), ((1268, 634), (4, 2)), ((2000, 1000), (4, 2)),
    # Square: (2,2) needs area > 401408, (3,3) needs > 903168.
    ((448, 448), (1, 1)), ((633, 633), (1, 1)), ((634, 634), (2, 2)), ((950, 950), (2, 2)), ((951, 951), (3, 3)),
    ((1344, 896), (3, 2)), ((900, 225), (4, 1)), ((64, 900), (1, 12)),
])
def test_choose_grid_cases(size, expected):
    assert choose_grid(*size, TilingConfig()) == expected == internvl_closest(*size)


def test_choose_grid_equal_area_tie_follows_candidate_order():
    # 5:4 is exactly 0.75 away from both 2:1 and 1:2, the only grids of area 2: the first in
    # candidate order stays for a small image; a large one (area > 200704) takes the second.
    cfg = TilingConfig(min_tiles=2, max_tiles=2)
    small, large = choose_grid(500, 400, cfg), choose_grid(1000, 800, cfg)
    assert {small, large} == {(1, 2), (2, 1)}
    assert small == candidate_grids(cfg)[0] == internvl_closest(500, 400, 2, 2)
    assert large == candidate_grids(cfg)[1] == internvl_closest(1000, 800, 2, 2)


def test_choose_grid_sweep_matches_internvl():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 4000, (400, 2))]
    sizes += [(w, h) for w in (1, 7, 448, 449, 896, 1344) for h in (1, 7, 448, 449, 896, 1344)]
    for max_tiles in (12, 6):
        cfg = TilingConfig(max_tiles=max_tiles)
        assert [choose_grid(w, h, cfg) for w, h in sizes] == [internvl_closest(w, h, 1, max_tiles) for w, h in sizes]


def test_config_validation_names_the_field():
    for kwargs, field in [({"max_tiles": 0}, "max_tiles"), ({"min_tiles": 0}, "min_tiles"),
                          ({"on_bad_sample": "drop"}, "on_bad_sample"), ({"std": (1.0, 0.0, 1.0)}, "std"),
                          ({"image_size": 0}, "image_size")]:
        with pytest.raises(ValueError, match=field):
            TilingConfig(**kwargs)


# --- the PIL reference -----------------------------------------------------------------------
def quadrant_image(cols: int, rows: int) -> tuple[Image.Image, list[tuple[int, int, int]]]:
    """Solid blocks of S x S, a distinct colour each, listed row-major."""
    colors = [(20 * k + 10, 255 - 20 * k, (77 * k) % 256) for k in range(cols * rows)]
    pixels = np.zeros((rows * S, cols * S, 3), np.uint8)
    for k, color in enumerate(colors):
        r, c = divmod(k, cols)
        pixels[r * S:(r + 1) * S, c * S:(c + 1) * S] = color
    return Image.fromarray(pixels), colors


def check_row_major(pixel_values: torch.Tensor, colors, cols: int, rows: int, atol: float) -> None:
    assert pixel_values.shape == (cols * rows + 1, 3, S, S)
    for k, color in enumerate(colors):
        expected = normalized(color).view(3, 1, 1).expand(3, S, S)
        torch.testing.assert_close(pixel_values[k], expected, atol=atol, rtol=0)
    # Thumbnail: the whole image at S x S; the centre of block k lands at its scaled centre.
    thumb = pixel_values[-1]
    for k, color in enumerate(colors):
        r, c = divmod(k, cols)
        y, x = int((r + 0.5) * S / rows), int((c + 0.5) * S / cols)
        torch.testing.assert_close(thumb[:, y, x], normalized(color), atol=atol, rtol=0)


def test_tiles_are_row_major_then_thumbnail():
    image, colors = quadrant_image(3, 2)
    tiled = tile_image(image, TilingConfig())
    assert tiled.grid == (3, 2) and tiled.num_tiles == 7 and tiled.pixel_values.dtype == torch.float32
    # The grid resize keeps the size (1344x896), so every tile is exactly its block's colour.
    check_row_major(tiled.pixel_values, colors, 3, 2, atol=0.0)


def test_thumbnail_only_with_more_than_one_tile():
    one = tile_image(Image.new("RGB", (448, 448), (1, 2, 3)), TilingConfig())
    assert one.grid == (1, 1) and one.num_tiles == 1
    image, _ = quadrant_image(3, 2)
    assert tile_image(image, TilingConfig(use_thumbnail=False)).num_tiles == 6
    assert tile_image(image, TilingConfig(max_tiles=1)).num_tiles == 1  # (1,1) is the only grid


def test_normalization_values():
    tiled = tile_image(Image.new("RGB", (300, 300), (0, 128, 255)), TilingConfig())
    expected = normalized((0, 128, 255))
    # ((0/255 - .485)/.229, (128/255 - .456)/.224, (255/255 - .406)/.225)
    torch.testing.assert_close(expected, torch.tensor([-2.117904, 0.205182, 2.64]), atol=1e-6, rtol=0)
    assert torch.equal(tiled.pixel_values[0], expected.view(3, 1, 1).expand(3, S, S))


@pytest.mark.parametrize("size", [(300, 200), (1000, 150), (37, 900), (1, 1), (1400, 700)])
def test_bit_identical_to_internvl_literal(size):
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    tiled = tile_image(image, TilingConfig())
    assert tiled.grid == internvl_closest(*size)
    assert torch.equal(tiled.pixel_values, internvl_literal(image))


def test_extreme_sizes(tmp_path):
    Image.new("RGB", (1, 1), (200, 10, 40)).save(tmp_path / "dot.png")
    dot = tile_file(tmp_path / "dot.png", TilingConfig())
    assert dot.grid == (1, 1) and dot.num_tiles == 1
    assert torch.equal(dot.pixel_values[0], normalized((200, 10, 40)).view(3, 1, 1).expand(3, S, S))
    Image.new("RGB", (10000, 10), (5, 6, 7)).save(tmp_path / "wide.png")
    wide = tile_file(tmp_path / "wide.png", TilingConfig())
    assert wide.grid == (12, 1) and wide.pixel_values.shape == (13, 3, S, S) and wide.source == str(tmp_path / "wide.png")
    assert torch.equal(wide.pixel_values, normalized((5, 6, 7)).view(1, 3, 1, 1).expand(13, 3, S, S))


# --- bad samples -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_and_good(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(d / "good.png")
    data = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "notes.txt").write_text("not an image\n")
    (d / "good2.jpg").write_bytes(jpeg_bytes(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)))
    (d / "corrupt_idat.png").write_bytes(corrupt_idat(data))
    return {"good": d / "good.png", "truncated": d / "truncated.png", "text": d / "notes.txt",
            "good2": d / "good2.jpg", "corrupt_idat": d / "corrupt_idat.png", "missing": d / "missing.png"}


def jpeg_bytes(pixels: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=92, **kwargs)
    return buf.getvalue()


def corrupt_idat(png: bytes) -> bytes:
    """Zeroes bytes inside the compressed data and fixes the chunk CRC: structurally valid PNG."""
    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[start:start + 4])
    body = bytearray(png[start + 8:start + 8 + length])
    body[100:140] = bytes(40)
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + body) & 0xFFFFFFFF)
    return png[:start + 8] + bytes(body) + crc + png[start + 12 + length:]


EXPECTED_REASONS = {
    "truncated": "cannot decode image: image file is truncated",
    "text": "not an image PIL can identify (corrupt or unsupported format)",
    "corrupt_idat": "cannot decode image: broken data stream when reading image file",
    "missing": "no such file",
}


def check_skip(tiler, files, caplog, backend: str) -> None:
    names = ["good", "truncated", "text", "good2", "corrupt_idat", "missing"]
    with caplog.at_level(logging.WARNING, logger="megatron_r1v.data"):
        result = tiler.tile_files([files[n] for n in names])
    assert [image is None for image in result.images] == [n in EXPECTED_REASONS for n in names]
    assert result.num_skipped == 4
    assert [(s.index, Path(s.path), s.reason) for s in result.skipped] == [
        (names.index(n), files[n], EXPECTED_REASONS[n]) for n in names if n in EXPECTED_REASONS]
    assert [i.source for i in result.kept()] == [str(files["good"]), str(files["good2"])]
    messages = [r.getMessage() for r in caplog.records if r.name == "megatron_r1v.data.tiling"]
    for n in EXPECTED_REASONS:
        assert any(str(files[n]) in m and EXPECTED_REASONS[n] in m for m in messages), (n, messages)
    assert any(m.startswith(f"{backend} tiling skipped 4 of 6 images") for m in messages), messages


def test_pil_skip_counts_and_logs(bad_and_good, caplog):
    check_skip(PILTiler(TilingConfig(on_bad_sample="skip"), num_threads=2), bad_and_good, caplog, "PIL")


def test_pil_error_policy_names_the_file(bad_and_good):
    tiler = PILTiler(TilingConfig(), num_threads=2)
    with pytest.raises(ImageError, match="truncated.png: cannot decode image: image file is truncated"):
        tiler.tile_files([bad_and_good["good"], bad_and_good["truncated"], bad_and_good["text"]])


# --- DALI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dali_tiler():
    # DALI is part of the test environment (tests/run.sh installs the data extra): a
    # missing DALI fails here instead of skipping the backend's tests. These tests cover
    # DALI's own operators; tests/unit/test_dali_plugin.py covers the r1v operator.
    return dali_tiling.DALITiler(TilingConfig(on_bad_sample="skip"), num_threads=2, batch_size=8, cpu_kernel="dali")


def test_dali_row_major_then_thumbnail(tmp_path, dali_tiler):
    image, colors = quadrant_image(3, 2)
    image.save(tmp_path / "blocks.png")
    (tiled,) = dali_tiler.tile_files([tmp_path / "blocks.png"]).images
    assert tiled.grid == (3, 2)
    # A same-size cubic resize is exact in DALI too; CMN computes (x - 255*mean) / (255*std)
    # instead of (x/255 - mean) / std, which differs in the last float32 bits only.
    check_row_major(tiled.pixel_values, colors, 3, 2, atol=1e-5)


def smooth(rng, h: int, w: int) -> np.ndarray:
    """Photo-like content: bilinearly upsampled coarse noise plus a few hard-edged boxes."""
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8))
    pixels = np.array(coarse.resize((w, h), Image.Resampling.BILINEAR))
    for _ in range(4):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        pixels[y:y + h // 5, x:x + w // 5] = rng.integers(0, 256, 3)
    return pixels


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> dict[str, Path]:
    """Every mode the DALI backend must treat like the reference (decoded by DALI or by load_rgb)."""
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(2)
    base = smooth(rng, 240, 320)
    files = {}

    def save(name, image, **kwargs):
        files[name] = d / name
        image.save(d / name, **kwargs)

    save("rgb.png", Image.fromarray(smooth(rng, 400, 600)))
    save("rgb.jpg", Image.fromarray(smooth(rng, 380, 500)), quality=90)
    save("big.jpg", Image.fromarray(smooth(rng, 1500, 2000)), quality=90)  # downscaled: antialiasing
    save("gray.jpg", Image.fromarray(base).convert("L"), quality=90)
    save("gray16.png", Image.fromarray((np.asarray(Image.fromarray(base).convert("L")).astype(np.uint16) * 257)))
    save("palette.png", Image.fromarray(base).convert("P"))
    p = Image.fromarray(base).convert("P")
    save("palette_trns.png", p, transparency=int(np.asarray(p)[0, 0]))
    rgba = np.dstack([base, np.where(np.arange(320) < 100, 0, 255).astype(np.uint8)[None, :].repeat(240, 0)])
    save("rgba.png", Image.fromarray(rgba))
    save("rgb_trns.png", Image.fromarray(base), transparency=tuple(int(v) for v in base[0, 0]))
    save("cmyk.jpg", Image.fromarray(base).convert("CMYK"), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif6.jpg", Image.fromarray(smooth(rng, 200, 400)), quality=90, exif=exif)
    save("noise.png", Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)))
    save("dot.png", Image.new("RGB", (1, 1), (200, 10, 40)))
    save("wide.png", Image.fromarray(rng.integers(0, 256, (10, 10000, 3), dtype=np.uint8)))
    return files


def test_dali_decoder_routing(odd_images):  # header parsing only: no DALI needed
    """Which files DALI decodes itself (None) and which go through load_rgb first (a reason)."""
    routes = {}
    for name, path in odd_images.items():
        data = path.read_bytes()
        with Image.open(path) as image:
            routes[name] = dali_tiling.pil_only_reason(image, data, 10**8)
    assert {n for n, r in routes.items() if r is None} == {
        "rgb.png", "rgb.jpg", "big.jpg", "gray.jpg", "gray16.png", "palette.png", "exif6.jpg", "noise.png",
        "dot.png", "wide.png"}
    assert routes["rgba.png"] == "format/mode ('PNG', 'RGBA', 'RGBA')"
    assert routes["palette_trns.png"] == routes["rgb_trns.png"] == "transparency"
    assert routes["cmyk.jpg"] == "format/mode ('JPEG', 'CMYK', 'CMYK;I')"
    data = odd_images["rgb.png"].read_bytes()[:-100]
    with Image.open(io.BytesIO(data)) as image:
        assert dali_tiling.pil_only_reason(image, data, 10**8) == "no PNG IEND chunk (truncated or trailing data)"


def test_dali_matches_pil(odd_images, dali_tiler):
    paths = list(odd_images.values())
    ref = PILTiler(TilingConfig(), num_threads=2).tile_files(paths)
    out = dali_tiler.tile_files(paths)
    assert out.num_skipped == 0
    diffs = {}
    for name, a, b in zip(odd_images, ref.images, out.images):
        assert (a.grid, a.pixel_values.shape, b.source) == (b.grid, b.pixel_values.shape, a.source), name
        diffs[name] = (a.pixel_values - b.pixel_values).abs()
    assert out.images[list(odd_images).index("exif6.jpg")].grid == (1, 2)  # 400x200 shown rotated: 200x400
    assert out.images[list(odd_images).index("wide.png")].num_tiles == 13
    # Measured (DALI 2.4.0, Pillow 13.0.0, this file's images), |PIL - DALI| in normalized
    # units, where one 8-bit level is 1/(255*std) = 0.0171..0.0175:
    #   smooth content (big.jpg, gray.jpg, gray16.png, exif6.jpg): max 0.0175 (1 level), mean 0.0015-0.0023
    #   smooth content with hard-edged boxes, upscaled (rgb.png, rgb.jpg, cmyk.jpg, rgba.png,
    #     rgb_trns.png): max 0.23, mean 0.0014-0.0021; dithered palettes: max 0.40, mean 0.0032
    #   uniform noise: max 0.44, mean 0.0052; 10000x10 noise (45x vertical upscale): max 0.25, mean 0.0080
    #   a 1x1 image (constant tiles): 0
    # Both use the same filter (Keys cubic, a = -0.5, widened by the scale when shrinking) and
    # agree to a level wherever the image is smooth. PIL rounds its horizontal pass to uint8,
    # clipping the cubic overshoot at hard edges, before the vertical pass; DALI keeps that
    # intermediate in float. That is where the large (rare: <2% of values beyond 1.5 levels
    # even for noise) differences are; the edge taps differ too (PIL renormalizes the kernel
    # cut by the border, DALI repeats the border pixel).
    level = 1 / (255 * min(STD))
    smooth_max = max(float(diffs[n].max()) for n in ("big.jpg", "gray.jpg", "gray16.png", "exif6.jpg"))
    assert smooth_max <= level + 1e-6, smooth_max
    assert max(float(d.max()) for d in diffs.values()) < 0.6
    all_but_noise = torch.cat([d.flatten() for n, d in diffs.items() if n not in ("noise.png", "wide.png")])
    assert float(all_but_noise.mean()) < 0.004, float(all_but_noise.mean())
    assert float(diffs["noise.png"].mean()) < 0.01 and float(diffs["wide.png"].mean()) < 0.015
    assert float(diffs["dot.png"].max()) < 1e-5


def test_dali_outputs_survive_later_runs(odd_images, dali_tiler):
    first = dali_tiler.tile_files([odd_images["rgb.png"], odd_images["gray.jpg"]])
    kept = [i.pixel_values.clone() for i in first.images]
    dali_tiler.tile_files([odd_images["noise.png"], odd_images["rgb.jpg"], odd_images["big.jpg"]])
    assert all(torch.equal(k, i.pixel_values) for k, i in zip(kept, first.images))


def test_dali_skip_counts_and_logs(bad_and_good, dali_tiler, caplog):
    # corrupt_idat passes the structural checks, so DALI's decoder fails its batch: the batch
    # is redone through load_rgb, which names the bad file exactly as the PIL backend does.
    check_skip(dali_tiler, bad_and_good, caplog, "DALI")
    assert any("DALI failed on a batch of" in r.getMessage() for r in caplog.records)
    after = dali_tiler.tile_files([bad_and_good["good"]])  # the rebuilt pipeline works
    assert after.images[0].grid == (4, 3) and after.images[0].num_tiles == 13  # 80x60: 4:3, however small


def test_dali_error_policy_names_the_file(bad_and_good):
    tiler = dali_tiling.DALITiler(TilingConfig(), num_threads=2, batch_size=8)
    with pytest.raises(ImageError, match="notes.txt: not an image PIL can identify"):
        tiler.tile_files([bad_and_good["good"], bad_and_good["text"]])
    with pytest.raises(ImageError, match="corrupt_idat.png: cannot decode image: broken data stream"):
        tiler.tile_files([bad_and_good["good2"], bad_and_good["corrupt_idat"]])


def test_dali_is_imported_lazily():
    code = ("import sys, megatron_r1v.data.tiling, megatron_r1v.data.dali_tiling; "
            "assert 'nvidia.dali' not in sys.modules, 'DALI imported at module import'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bench_data_smoke(tmp_path, capsys):
    bench = load_tool("bench_data")
    report = bench.main(["--num", "6", "--repeats", "1", "--warmup", "2", "--source", "drawn",
                         "--work-dir", str(tmp_path), "--e2e-pairs-per-step", "3"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == report
    assert report["num_images"] == 6 and report["images"] == "drawn"
    assert report["pil_images_per_s"] > 0 and report["dali_images_per_s"] > 0
    assert report["kernel_speedup"] == pytest.approx(report["dali_images_per_s"] / report["pil_images_per_s"],
                                                     rel=0.02)
    # End to end: the MPO loader path over 6 pairs in 2 steps, packed batches equal with either tiler.
    assert report["e2e_pairs"] == 6 and report["e2e_pairs_per_step"] == 3 and report["e2e_identical_batches"]
    assert report["e2e_speedup"] == pytest.approx(report["e2e_dali_pairs_per_s"] / report["e2e_pil_pairs_per_s"],
                                                  rel=0.02)
    # The r1v operator reproduces the reference exactly; DALI's own operators are timed beside it.
    assert report["dali_cpu_kernel"] == "r1v" and report["max_abs_diff"] == 0.0
    assert report["dali_ops_images_per_s"] > 0 and report["num_tiles"] > 6


# --- embedded images (encoded bytes in memory, e.g. a benchmark's parquet cell) ---------------
def encode(image: Image.Image, name: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG" if name.endswith(".jpg") else "PNG", **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, tuple[Path, EmbeddedImage]]:
    """Each image as a file and as an EmbeddedImage of the same bytes: ones DALI decodes and
    ones it leaves to load_rgb (alpha, palette transparency)."""
    d = tmp_path_factory.mktemp("embedded")
    rng = np.random.default_rng(3)
    base = smooth(rng, 240, 320)
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = Image.fromarray(base).convert("P")
    alpha = np.where(np.arange(320) < 100, 0, 255).astype(np.uint8)[None, :].repeat(240, 0)
    images = {
        "rgb.png": (Image.fromarray(smooth(rng, 400, 600)), {}),
        "rgb.jpg": (Image.fromarray(smooth(rng, 380, 500)), {"quality": 90}),
        "gray.jpg": (Image.fromarray(base).convert("L"), {"quality": 90}),
        "exif6.jpg": (Image.fromarray(smooth(rng, 200, 400)), {"quality": 90, "exif": exif}),
        "palette.png": (palette, {}),
        "palette_trns.png": (palette, {"transparency": int(np.asarray(palette)[0, 0])}),
        "rgba.png": (Image.fromarray(np.dstack([base, alpha])), {}),
    }
    out = {}
    for row, (name, (image, kwargs)) in enumerate(images.items()):
        data = encode(image, name, **kwargs)
        (d / name).write_bytes(data)
        out[name] = (d / name, EmbeddedImage(f"bench.parquet:row {row}:{name}", data))
    return out


def make_tiler(kind: str, on_bad_sample: str = "skip"):
    """The PIL reference, DALI with the r1v operator (bit-exact with PIL) or with DALI's own
    operators; a batch of 3 so that a call spans several batches, mixing DALI-decoded images
    with load_rgb-decoded ones that wait for a full batch."""
    cfg = TilingConfig(on_bad_sample=on_bad_sample)
    if kind == "pil":
        return PILTiler(cfg, num_threads=2)
    return dali_tiling.DALITiler(cfg, num_threads=2, batch_size=3, cpu_kernel="r1v" if kind == "r1v" else "dali")


TILER_KINDS = ["pil", "r1v", "dali"]


@pytest.mark.parametrize("kind", TILER_KINDS)
def test_embedded_images_tile_bit_identically_to_their_files(embedded, kind):
    tiler = make_tiler(kind)
    files, blobs = [f for f, _ in embedded.values()], [e for _, e in embedded.values()]
    from_files, from_bytes = tiler.tile_files(files), tiler.tile_files(blobs)
    assert from_files.num_skipped == from_bytes.num_skipped == 0
    for name, a, b, blob in zip(embedded, from_files.images, from_bytes.images, blobs):
        # The same bytes through the same decoder and graph: equal bits, not merely close.
        assert a.grid == b.grid and torch.equal(a.pixel_values, b.pixel_values), name
        assert (a.source, b.source) == (str(embedded[name][0]), blob.name)
    assert from_bytes.images[list(embedded).index("exif6.jpg")].grid == (1, 2)  # rotated from the bytes' EXIF
    if kind == "r1v":  # and equal to the PIL reference, as for files
        ref = PILTiler(TilingConfig()).tile_files(blobs)
        assert all(torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(ref.images, from_bytes.images))


def test_embedded_alpha_and_palette_transparency_go_the_load_rgb_way_in_dali(embedded):
    tiler = make_tiler("r1v")
    for name, route in [("rgba.png", "format/mode ('PNG', 'RGBA', 'RGBA')"), ("palette_trns.png", "transparency"),
                        ("palette.png", None), ("rgb.png", None)]:
        blob = embedded[name][1]
        with Image.open(io.BytesIO(blob.data)) as image:
            assert dali_tiling.pil_only_reason(image, blob.data, 10**8) == route, name
        item = tiler._prepare(0, blob)
        # load_rgb's decoded [H, W, 3] pixels (composited over white), or the bytes for DALI's decoder.
        assert item.data.ndim == (1 if route is None else 3) and item.path == blob.name and item.source is blob
        (got,) = tiler.tile_files([blob]).images
        (want,) = PILTiler(TilingConfig()).tile_files([blob]).images
        assert torch.equal(got.pixel_values, want.pixel_values), name


@pytest.mark.parametrize("kind", TILER_KINDS)
def test_mixed_paths_and_embedded_images_keep_input_order(embedded, kind):
    tiler = make_tiler(kind)
    # Alternating kinds; rgba and palette_trns wait in the load_rgb queue while later DALI
    # batches run, so only the input index can put them back in place.
    sources = [file if i % 2 else blob for i, (file, blob) in enumerate(embedded.values())]
    sources += [embedded["rgba.png"][0], embedded["rgb.png"][1]]
    result = tiler.tile_files(sources)
    assert [i.source for i in result.images] == [str(s) for s in sources]
    for source, got in zip(sources, result.images):
        (alone,) = tiler.tile_files([source]).images  # each image on its own: no order to get wrong
        assert torch.equal(got.pixel_values, alone.pixel_values), str(source)


def bad_blobs(embedded) -> tuple[list[EmbeddedImage], dict[int, str]]:
    """A good embedded image among bad ones; {index: reason} of the bad ones."""
    png = embedded["rgb.png"][1].data
    blobs = [embedded["rgb.jpg"][1], EmbeddedImage("bench.parquet:row 7:image", b"not an image\n"),
             EmbeddedImage("bench.parquet:row 8:image", png[: len(png) // 2]),
             EmbeddedImage("bench.parquet:row 9:image", corrupt_idat(png)),  # DALI's decoder fails its batch
             EmbeddedImage("bench.parquet:row 10:image", b"")]
    return blobs, {1: EXPECTED_REASONS["text"], 2: EXPECTED_REASONS["truncated"], 3: EXPECTED_REASONS["corrupt_idat"],
                   4: EXPECTED_REASONS["text"]}


@pytest.mark.parametrize("kind", TILER_KINDS)
def test_bad_embedded_bytes_are_named_by_the_image_name(embedded, kind, caplog):
    blobs, reasons = bad_blobs(embedded)
    with caplog.at_level(logging.WARNING, logger="megatron_r1v.data"):
        result = make_tiler(kind).tile_files(blobs)
    assert [(s.index, s.path, s.reason) for s in result.skipped] == [(i, blobs[i].name, r) for i, r in reasons.items()]
    assert [image is None for image in result.images] == [i in reasons for i in range(len(blobs))]
    assert all(f"{blobs[i].name}: {r}" in caplog.text for i, r in reasons.items()), caplog.text
    for index, reason in reasons.items():
        with pytest.raises(ImageError) as info:
            make_tiler(kind, on_bad_sample="error").tile_files([blobs[0], blobs[index]])
        assert (info.value.path, info.value.reason, str(info.value)) == (blobs[index].name, reason,
                                                                          f"{blobs[index].name}: {reason}")


def test_tiling_embedded_images_creates_no_temporary_file(embedded, tmp_path, monkeypatch):
    blobs = [blob for _, blob in embedded.values()] + bad_blobs(embedded)[0]
    tilers = [make_tiler(kind) for kind in TILER_KINDS]
    for tiler in tilers:
        tiler.tile_files(blobs[:1])  # builds the pipelines (and the r1v operator) before the watch starts
    # An empty temporary directory for this test (a shared /tmp changes under other processes),
    # and the tempfile functions made to fail: an unnamed O_TMPFILE would not show in a listing.
    fresh = tmp_path / "tmp"
    fresh.mkdir()
    monkeypatch.setenv("TMPDIR", str(fresh))
    monkeypatch.setattr(tempfile, "tempdir", str(fresh))

    def refuse(*args, **kwargs):
        raise AssertionError("a temporary file was created while tiling embedded images")

    for fn in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile",
               "TemporaryDirectory"):
        monkeypatch.setattr(tempfile, fn, refuse)
    assert tempfile.gettempdir() == str(fresh)
    for tiler in tilers:
        result = tiler.tile_files(blobs)
        assert result.num_skipped == 4 and len(result.kept()) == len(embedded) + 1
    assert list(fresh.iterdir()) == []
