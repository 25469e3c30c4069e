"""Prompt loader: epoch permutations, DP sharding, resumable cursor, bad samples."""

import logging

import pytest
import torch

from megatron_r1v.data.images import ImageError
from megatron_r1v.data.loader import PromptLoader
from megatron_r1v.data.schema import load_records
from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.template import ChatTemplate, TemplateConfig
from megatron_r1v.data.tiling import PILTiler, TilingConfig
from megatron_r1v.data.tokenizer import build_tokenizer

N_RECORDS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("loader")
    generate_dataset(root / "data", N_RECORDS, seed=3)
    build_tokenizer([root / "data" / "prompts.jsonl"], 600, root / "tok")
    template = ChatTemplate(AutoTokenizer.from_pretrained(str(root / "tok")), TemplateConfig(tokens_per_tile=4))
    records = load_records(root / "data" / "prompts.jsonl", "prompts").records
    return records, template


def make(setup, **kwargs):
    records, template = setup
    tiler = PILTiler(TilingConfig(image_size=56, max_tiles=4, on_bad_sample=kwargs.pop("tile_policy", "error")))
    return PromptLoader(records, template, tiler, seed=7, **kwargs)


def test_epochs_visit_every_record_once(setup):
    loader = make(setup)
    first = loader.next_indices(4) + loader.next_indices(4) + loader.next_indices(4)
    # 12 positions over 10 records: epoch 0 is a permutation, epoch 1 starts another.
    assert sorted(first[:N_RECORDS]) == list(range(N_RECORDS))
    assert (loader.cursor.epoch, loader.cursor.position) == (1, 2)
    assert first[:N_RECORDS] != list(range(N_RECORDS))  # shuffled (seed 7)


def test_dp_ranks_partition_the_global_batch(setup):
    single = make(setup)
    ranks = [make(setup, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        order = single.next_indices(4)
        shares = [loader.next_indices(4)[loader.dp_rank::2] for loader in ranks]
        assert shares == [order[0::2], order[1::2]]
    with pytest.raises(ValueError, match=r"prompts per step \(3\) must be a positive multiple of dp_size \(2\)"):
        ranks[0].next_indices(3)


def test_items_and_resume(setup):
    records, template = setup
    loader = make(setup)
    seen = [loader.next_batch(2) for _ in range(3)]
    state = loader.state_dict()
    expected = loader.next_batch(2)
    resumed = make(setup)
    resumed.load_state_dict(state)
    got = resumed.next_batch(2)
    assert [i.record.id for i in got] == [i.record.id for i in expected]
    for a, b in zip(got, expected):
        assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.pixel_values, b.pixel_values)
    image_id = template.image_token_id
    for item in [i for batch in seen for i in batch]:
        assert len(item.tiles_per_image) == len(item.record.images) == 1
        assert item.pixel_values.shape == (sum(item.tiles_per_image), 3, 56, 56)
        assert int((item.prompt_ids == image_id).sum()) == 4 * sum(item.tiles_per_image)
    with pytest.raises(ValueError, match="data cursor was saved for seed 7 over 10 records; this run has seed 8"):
        PromptLoader(records, template, PILTiler(TilingConfig(image_size=56)), seed=8).load_state_dict(state)


def test_bad_image_at_tiling_time(setup, tmp_path, caplog):
    records, template = setup
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = [r.__class__(**{**r.__dict__, "images": (broken,)}) for r in records[:1]] + list(records[1:3])
    tiler = PILTiler(TilingConfig(image_size=56, max_tiles=4))
    strict = PromptLoader(bad, template, tiler, seed=0)
    with pytest.raises(ImageError, match="broken.png"):
        for _ in range(3):
            strict.next_batch(1)
    lenient = PromptLoader(bad, template, tiler, seed=0, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING):
        items = [item for _ in range(3) for item in lenient.next_batch(1)]
    assert len(items) == 2 and lenient.cursor.skipped == 1
    assert f"skipping prompt {records[0].id} (on_bad_sample=skip; 1 skipped so far)" in caplog.text
    assert "broken.png" in caplog.text
