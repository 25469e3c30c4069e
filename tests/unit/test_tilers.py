"""data.tiler: which tiler runs (data/tilers.py), the configuration checks, the rank roles of
data/replica_tiling.py, and the loaders giving identical batches with either tiler.

Real DALI (the ``data`` extra) and the real ``r1v.internvl_tiles`` operator: a build failure
is produced by pointing the operator's build at a compiler that does not exist.
"""

from __future__ import annotations

import functools
import json
import logging
import sys

import pytest
import torch
from PIL import Image

from megatron_r1v.config import DataConfig, RunConfig, load_config
from megatron_r1v.data import dali_plugin
from megatron_r1v.data.dali_tiling import DALITiler
from megatron_r1v.data.images import ImageError
from megatron_r1v.data.loader import PairLoader, PromptLoader
from megatron_r1v.data.packing import pack_pairs
from megatron_r1v.data.replica_tiling import ReplicaTiler, layout_only, tiling_role
from megatron_r1v.data.schema import load_records, referenced_images
from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.template import ChatTemplate, TemplateConfig
from megatron_r1v.data.tilers import TilerUnavailable, build_tiler
from megatron_r1v.data.tiling import PILTiler, TilingConfig
from megatron_r1v.data.tokenizer import build_tokenizer
from megatron_r1v.validation import preflight, validate_config

TILING = TilingConfig(image_size=56, max_tiles=4)


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def operator_fails_to_build(monkeypatch, tmp_path):
    """The operator's real build, from an empty cache, with a compiler that does not exist."""
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setenv("MEGATRON_R1V_CACHE_DIR", str(tmp_path / "cache"))
    # load() caches its result per process (the operator may already be loaded by other tests).
    monkeypatch.setattr(dali_plugin, "load", functools.lru_cache(maxsize=None)(dali_plugin.load.__wrapped__))


@pytest.fixture
def no_dali(monkeypatch):
    """As if NVIDIA DALI were not installed: importing it fails."""
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)


def test_auto_picks_dali_with_the_operator(caplog):
    with caplog.at_level(logging.WARNING):
        tiler, description = build_tiler(DataConfig(), TILING)
    assert isinstance(tiler, DALITiler) and tiler.cpu_kernel == "r1v" and tiler.num_threads == 2
    assert description == "dali (r1v.internvl_tiles, 2 threads)"
    assert not warnings_of(caplog)
    dali, _ = build_tiler(DataConfig(tiler="dali", tiler_threads=1), TILING)
    assert isinstance(dali, DALITiler) and dali.num_threads == 1


def test_pil_when_asked():
    tiler, description = build_tiler(DataConfig(tiler="pil", tiler_threads=3), TILING)
    assert type(tiler) is PILTiler and tiler.num_threads == 3 and tiler.config == TILING
    assert description == "pil (3 threads; data.tiler=pil)"


def test_auto_falls_back_to_pil_with_one_warning_when_the_operator_does_not_build(operator_fails_to_build, caplog):
    with caplog.at_level(logging.WARNING):
        tiler, description = build_tiler(DataConfig(tiler_threads=2), TILING)
    assert type(tiler) is PILTiler and tiler.num_threads == 2
    (warning,) = warnings_of(caplog)  # one warning, naming the reason
    assert "data.tiler=auto: tiling with PIL" in warning.message
    assert "C++ compiler '/nonexistent/g++' not found" in warning.message
    assert description.startswith("pil (2 threads; DALI unavailable: the r1v.internvl_tiles DALI operator is "
                                  "unavailable: C++ compiler '/nonexistent/g++' not found")


def test_auto_falls_back_to_pil_without_dali(no_dali, caplog):
    with caplog.at_level(logging.WARNING):
        tiler, description = build_tiler(DataConfig(), TILING)
    assert type(tiler) is PILTiler
    (warning,) = warnings_of(caplog)
    assert "DALITiler needs NVIDIA DALI: pip install 'megatron-r1v[data]'" in warning.message
    assert description.startswith("pil (2 threads; DALI unavailable: DALITiler needs NVIDIA DALI")


def test_explicit_dali_is_an_error_when_it_cannot_run(no_dali, tmp_path):
    with pytest.raises(TilerUnavailable, match=r"^data\.tiler=dali: DALITiler needs NVIDIA DALI.*"
                                               r"\(or set data\.tiler to auto or pil to tile with PIL\)$"):
        build_tiler(DataConfig(tiler="dali"), TILING)
    with pytest.raises(TilerUnavailable, match=r"^--tiler=dali: DALITiler needs NVIDIA DALI"):
        build_tiler(DataConfig(tiler="dali"), TILING, key="--tiler")
    # The preflight of a training run says so before any process group exists.
    (tmp_path / "tok").mkdir()
    (tmp_path / "prompts.jsonl").write_text("")
    cfg = load_config(None, ["data.tiler=dali", f"data.train_path={tmp_path / 'prompts.jsonl'}",
                             f"data.tokenizer={tmp_path / 'tok'}"])
    with pytest.raises(ValueError, match=r"^data\.tiler=dali: NVIDIA DALI is not installed"):
        preflight(cfg)


def test_explicit_dali_is_an_error_when_the_operator_does_not_build(operator_fails_to_build):
    with pytest.raises(TilerUnavailable, match=r"^data\.tiler=dali: the r1v\.internvl_tiles DALI operator is "
                                               r"unavailable: C\+\+ compiler '/nonexistent/g\+\+' not found"):
        build_tiler(DataConfig(tiler="dali"), TILING)


def test_a_dali_tiler_that_differs_from_pil_is_not_used(monkeypatch, caplog):
    real = DALITiler.tile_files

    def off_by_a_bit(self, paths):
        result = real(self, paths)
        result.images[0].pixel_values[0, 0, 0, 0] += 1e-3
        return result

    monkeypatch.setattr(DALITiler, "tile_files", off_by_a_bit)
    with caplog.at_level(logging.WARNING):
        tiler, description = build_tiler(DataConfig(), TILING)
    assert type(tiler) is PILTiler and "differ from the PIL reference" in description
    assert len(warnings_of(caplog)) == 1
    with pytest.raises(TilerUnavailable, match="probe image differ from the PIL reference"):
        build_tiler(DataConfig(tiler="dali"), TILING)


@pytest.mark.parametrize("override, message", [
    ("data.tiler=gpu", r"config key 'data\.tiler': 'gpu' is not one of \['auto', 'dali', 'pil'\]"),
    ("data.tiler_threads=0", r"data\.tiler_threads must be >= 1, got 0"),
    ("data.tiler_threads=1.5", r"config key 'data\.tiler_threads': expected int, got float 1\.5"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_validation_of_a_config_built_by_hand():
    assert load_config(None, []).data.tiler == "auto" and load_config(None, []).data.tiler_threads == 2
    with pytest.raises(ValueError, match=r"^data\.tiler must be one of auto, dali, pil, got 'nvjpeg'$"):
        validate_config(RunConfig(data=DataConfig(tiler="nvjpeg")))
    with pytest.raises(ValueError, match=r"^data\.tiler_threads must be an integer >= 1, got True$"):
        validate_config(RunConfig(data=DataConfig(tiler_threads=True)))
    with pytest.raises(ValueError, match=r"^data\.tiler_threads must be >= 1, got -2$"):
        build_tiler(DataConfig(tiler="pil", tiler_threads=-2), TILING)


def test_rank_roles():
    assert [tiling_role(tp, 0) for tp in range(3)] == ["tile", "receive", "receive"]
    assert [tiling_role(tp, pp) for tp in range(2) for pp in (1, 3)] == ["layout"] * 4
    placeholder = layout_only(5)
    assert placeholder.shape == (5, 0) and placeholder.numel() == 0
    assert torch.cat([placeholder, layout_only(2)]).shape == (7, 0)
    with pytest.raises(ValueError, match="a 'receive' rank takes no tiler"):
        ReplicaTiler(PILTiler(TILING), TILING, "receive", None, None)
    with pytest.raises(ValueError, match="a 'tile' rank needs tiler"):
        ReplicaTiler(None, TILING, "tile", None, None)


# --- the loaders with either tiler ---------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tilers")
    generate_dataset(root, 12, seed=5)
    build_tokenizer([root / "prompts.jsonl", root / "preferences.jsonl"], 640, root / "tok")
    template = ChatTemplate(AutoTokenizer.from_pretrained(str(root / "tok")),
                            TemplateConfig(tokens_per_tile=4, max_seq_len=400))
    return root, template


def test_loaders_give_identical_batches_with_pil_and_dali(dataset):
    root, template = dataset
    tilers = {name: build_tiler(DataConfig(tiler=name), TILING).tiler for name in ("pil", "dali")}
    assert isinstance(tilers["dali"], DALITiler)
    prompts = load_records(root / "prompts.jsonl", "prompts").records
    batches = {name: [PromptLoader(prompts, template, t, seed=3).next_batch(6) for _ in range(1)][0]
               for name, t in tilers.items()}
    assert len(batches["pil"]) == 6
    for a, b in zip(batches["pil"], batches["dali"], strict=True):
        assert a.record.id == b.record.id and a.tiles_per_image == b.tiles_per_image and sum(a.tiles_per_image) > 0
        assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.pixel_values, b.pixel_values)
    # MPO's path: pairs -> tiles -> packed rows, as the trainer packs them.
    pairs = load_records(root / "preferences.jsonl", "preferences").records
    packed = {name: pack_pairs(PairLoader(pairs, template, t, seed=3).next_batch(8), 800, pipeline=False)
              for name, t in tilers.items()}
    assert len(packed["pil"]) >= 2
    for a, b in zip(packed["pil"], packed["dali"], strict=True):
        assert a.pixel_values.shape[0] > 0 and a.sample_ids == b.sample_ids
        for field in ("input_ids", "labels", "loss_mask", "position_ids", "cu_seqlens", "pixel_values"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_one_tiling_call_per_batch_and_the_same_bad_sample_policy(dataset, tmp_path, caplog):
    root, template = dataset
    records = load_records(root / "prompts.jsonl", "prompts").records[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records[1] = records[1].__class__(**{**records[1].__dict__, "images": (broken,)})
    calls = []

    class Counting(PILTiler):
        def tile_files(self, paths):
            calls.append(len(paths))
            return super().tile_files(paths)

    # Tiler policy skip: one call for the batch, the bad record skipped by the loader.
    lenient = PromptLoader(records, template, Counting(TilingConfig(56, 4, on_bad_sample="skip")), seed=0,
                           on_bad_sample="skip")
    with caplog.at_level(logging.WARNING):
        items = lenient.prepare_many(records)
    assert calls == [3] and [i is None for i in items] == [False, True, False] and lenient.cursor.skipped == 1
    # Tiler policy error (the tiler raises for the batch): tiled again record by record, so
    # the loader's policy still applies per record, exactly as when each is prepared alone.
    calls.clear()
    mixed = PromptLoader(records, template, Counting(TilingConfig(56, 4)), seed=0, on_bad_sample="skip")
    items = mixed.prepare_many(records)
    assert calls == [3, 1, 1, 1] and [i is None for i in items] == [False, True, False]
    assert torch.equal(items[2].pixel_values, lenient.prepare_many(records)[2].pixel_values)
    strict = PromptLoader(records, template, Counting(TilingConfig(56, 4)), seed=0)
    with pytest.raises(ImageError, match="broken.png"):
        strict.prepare_many(records)
    # The data time of a step: what prepare_many took, handed out once.
    assert strict.data_seconds > 0 and strict.take_data_seconds() > 0 and strict.take_data_seconds() == 0.0


def test_referenced_images_lists_every_file_without_decoding(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [{"id": 1, "images": ["a.png"], "question": "q", "answer": "1", "answer_type": "number"},
             {"id": 2, "images": ["missing.png"], "question": "q", "answer": "1", "answer_type": "number"},
             {"id": 3, "images": ["a.png"], "question": "q", "answer": "1"}]  # a bad record (no answer_type)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded an image"))
    assert referenced_images(tmp_path / "p.jsonl", "prompts") == [tmp_path / "a.png", tmp_path / "missing.png"]
    # Verdicts given as ``checked`` are used as they are: nothing is decoded.
    records = load_records(tmp_path / "p.jsonl", "prompts", "skip",
                           checked={tmp_path / "a.png": None, tmp_path / "missing.png": "no such file"}).records
    assert [r.id for r in records] == ["1"]
