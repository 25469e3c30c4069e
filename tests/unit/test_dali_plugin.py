"""The r1v.internvl_tiles DALI operator: bit-exact against the PIL reference, its build, its errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from megatron_r1v.data import dali_plugin
from megatron_r1v.data.dali_tiling import DALITiler
from megatron_r1v.data.tiling import PILTiler, TilingConfig


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth content with hard-edged boxes: cubic overshoot at edges exercises the uint8 clipping."""
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 30), max(2, w // 30), 3), dtype=np.uint8))
    pixels = np.array(coarse.resize((w, h), Image.Resampling.BILINEAR))
    for _ in range(5):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        pixels[y:y + max(1, h // 6), x:x + max(1, w // 6)] = rng.integers(0, 256, 3)
    return pixels


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Upscaled and downscaled grids, both Pillow pass orders, files DALI decodes and files load_rgb does."""
    d = tmp_path_factory.mktemp("plugin")
    rng = np.random.default_rng(7)
    files = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        files[name] = d / name
        image.save(d / name, **kwargs)

    save("small.png", Image.fromarray(photo(rng, 90, 130)))            # every pass upscales
    save("tall.png", Image.fromarray(photo(rng, 1400, 300)))           # thumbnail: vertical pass first
    save("wide.jpg", Image.fromarray(photo(rng, 300, 1400)), quality=92)
    save("big.jpg", Image.fromarray(photo(rng, 1500, 2000)), quality=92)  # grid and thumbnail downscale
    save("noise.png", Image.fromarray(rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)))
    save("gray.png", Image.fromarray(photo(rng, 240, 320)).convert("L"))
    save("palette_trns.png", Image.fromarray(photo(rng, 200, 260)).convert("P"), transparency=0)  # via load_rgb
    save("rgba.png", Image.fromarray(np.dstack([photo(rng, 150, 170), np.full((150, 170), 128, np.uint8)])))
    save("dot.png", Image.new("RGB", (1, 1), (200, 10, 40)))
    save("line.png", Image.fromarray(rng.integers(0, 256, (10, 3000, 3), dtype=np.uint8)))  # extreme aspect
    return files


def assert_identical(ref, out, names) -> None:
    assert out.num_skipped == 0
    for name, a, b in zip(names, ref.images, out.images):
        assert (a.grid, a.source) == (b.grid, b.source), name
        assert a.pixel_values.shape == b.pixel_values.shape, name
        # Bit for bit: the operator is Pillow's fixed-point resampling with the reference's
        # own normalization table, and DALI's decoder gives PIL's pixels for these files.
        assert torch.equal(a.pixel_values, b.pixel_values), (name, float((a.pixel_values - b.pixel_values).abs().max()))


def test_bit_exact_against_the_pil_reference(images):
    tiler = DALITiler(TilingConfig(), num_threads=2, batch_size=4)
    assert tiler.cpu_kernel == "r1v"
    paths = list(images.values())
    assert_identical(PILTiler(TilingConfig(), num_threads=2).tile_files(paths), tiler.tile_files(paths), images)
    grids = {n: i.grid for n, i in zip(images, tiler.tile_files(paths).images)}
    assert grids["dot.png"] == (1, 1) and grids["line.png"][0] >= 6 and grids["tall.png"][1] > grids["tall.png"][0]


@pytest.mark.parametrize("config", [TilingConfig(image_size=56, max_tiles=6, use_thumbnail=False),
                                    TilingConfig(image_size=37, max_tiles=9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))],
                         ids=["no-thumbnail-56", "odd-size-37"])
def test_other_tile_sizes_and_normalizations(images, config):
    paths = list(images.values())
    tiler = DALITiler(config, num_threads=1, batch_size=3)
    assert_identical(PILTiler(config).tile_files(paths), tiler.tile_files(paths), images)


def test_pass_order_probe_matches_installed_pillow():
    # Pillow 13 (python-pillow/Pillow#9549) resamples vertically first when the height shrinks
    # by more than twice as many pixels as the width; older releases always go horizontally first.
    assert dali_plugin.pillow_vertical_first_rule() is (int(PIL.__version__.split(".")[0]) >= 13)


def test_normalization_table_is_the_reference_normalization():
    cfg = TilingConfig()
    lut = torch.tensor(dali_plugin.normalization_lut(cfg)).view(3, 256)
    expected = (torch.arange(256.0) / 255.0 - torch.tensor(cfg.mean).view(3, 1)) / torch.tensor(cfg.std).view(3, 1)
    assert torch.allclose(lut, expected, atol=1e-6)
    assert float(lut[0, 0]) == pytest.approx(-0.485 / 0.229, abs=1e-6)


def run_operator(image: np.ndarray, grid: np.ndarray, lut=None, layout: str = "HWC"):
    import nvidia.dali as dali
    dali_plugin.load()
    pipe = dali.pipeline.Pipeline(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    with pipe:
        x = dali.fn.external_source(name="x", dtype=dali.types.UINT8, ndim=image.ndim, layout=layout)
        g = dali.fn.external_source(name="g", dtype=dali.types.INT32, ndim=1)
        pipe.set_outputs(dali.fn.r1v.internvl_tiles(x, g, tile_size=8, lut=lut or [0.0] * 768))
    pipe.build()
    pipe.feed_input("x", [image])
    pipe.feed_input("g", [grid])
    return pipe.run()[0]


def test_operator_rejects_bad_inputs():
    rgb = np.zeros((5, 7, 3), np.uint8)
    out = run_operator(rgb, np.array([2, 1], np.int32))
    assert out[0].shape() == [3, 3, 8, 8] and out.layout() == "FCHW"  # 2 tiles + thumbnail
    with pytest.raises(RuntimeError, match="sample 0 is not a non-empty HWC image with 3 channels"):
        run_operator(np.zeros((5, 7, 4), np.uint8), np.array([1, 1], np.int32))
    with pytest.raises(RuntimeError, match=r"grid of sample 0 must be \[cols, rows\]"):
        run_operator(rgb, np.array([1, 1, 1], np.int32))
    with pytest.raises(RuntimeError, match="grid of sample 0 must be positive"):
        run_operator(rgb, np.array([0, 2], np.int32))
    with pytest.raises(RuntimeError, match="lut must hold 3 x 256 values, got 5"):
        run_operator(rgb, np.array([1, 1], np.int32), lut=[0.0] * 5)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty plugin cache; the process-wide caches are restored afterwards."""
    monkeypatch.setenv("MEGATRON_R1V_CACHE_DIR", str(tmp_path / "cache"))
    dali_plugin.load.cache_clear()
    yield tmp_path / "cache" / "dali_plugins"
    dali_plugin.load.cache_clear()


def test_builds_from_the_wheel_headers_and_caches(fresh_cache, monkeypatch):
    # No CUDA toolkit: the headers come from the data extra's nvidia-cuda-* wheels.
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(dali_plugin, "SYSTEM_CUDA_INCLUDE", Path("/nonexistent/cuda/include"))
    assert all("site-packages" in str(d) for d in dali_plugin._cuda_include_dirs())
    library = dali_plugin.library_path()
    assert library.parent == fresh_cache and library.stat().st_size > 0
    assert [p.name for p in fresh_cache.glob("*.so")] == [library.name]  # no temporary left behind
    mtime = library.stat().st_mtime_ns
    assert dali_plugin.library_path() == library and library.stat().st_mtime_ns == mtime  # cached, not rebuilt


def test_missing_compiler_falls_back_with_a_warning(fresh_cache, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(dali_plugin.PluginBuildError, match="C\\+\\+ compiler '/nonexistent/g\\+\\+' not found"):
        DALITiler(TilingConfig(), cpu_kernel="r1v")
    with caplog.at_level(logging.WARNING, logger="megatron_r1v.data.dali_tiling"):
        tiler = DALITiler(TilingConfig(), cpu_kernel="auto")
    assert tiler.cpu_kernel == "dali"
    assert any("r1v.internvl_tiles unavailable" in r.getMessage() and "not found" in r.getMessage()
               for r in caplog.records)


def test_compile_errors_name_the_command(fresh_cache, monkeypatch, tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(dali_plugin, "SOURCE", broken)
    with pytest.raises(dali_plugin.PluginBuildError, match="compiling .*broken.cc failed") as info:
        dali_plugin.library_path()
    assert "g++" in str(info.value) and "error" in str(info.value)
    assert not list(fresh_cache.glob("*.so"))  # nothing half-written


def test_gpu_device_refuses_the_cpu_operator():
    with pytest.raises(ValueError, match="cpu_kernel='r1v' is a CPU operator"):
        DALITiler(TilingConfig(), device="gpu", cpu_kernel="r1v")
    with pytest.raises(ValueError, match="cpu_kernel must be"):
        DALITiler(TilingConfig(), cpu_kernel="fast")
