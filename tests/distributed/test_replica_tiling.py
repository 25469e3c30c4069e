"""One tiling rank per replica at TP=2 x PP=2 (4 gloo ranks, worker docstring has the setup).

Rank 0 (first TP rank, first stage) decodes and tiles; rank 1 (its TP peer) receives the
same tensors; ranks 2-3 (second stage) open no image file at all, yet get the same tile
counts and prompt ids; the items equal a single-process PIL loader's; bad images end the
same way on every rank.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.tokenizer import build_tokenizer

WORKER = "tests/distributed/workers/replica_tiling_worker.py"
STEPS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("replica_tiling")
    generate_dataset(root, 10, seed=3)
    build_tokenizer([root / "prompts.jsonl"], 600, root / "tok")
    # prompts_bad.jsonl: the first 3 prompts, the second one's image cut in half (a valid
    # header, truncated data: only a full decode finds it).
    lines = (root / "prompts.jsonl").read_text().splitlines()[:3]
    second = json.loads(lines[1])
    image = root / second["images"][0]
    (root / "truncated.png").write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    second["images"] = ["truncated.png"]
    lines[1] = json.dumps(second)
    (root / "prompts_bad.jsonl").write_text("\n".join(lines) + "\n")
    return root


def reference_items(data: Path, dp_rank: int = 0, dp_size: int = 1) -> list[list[dict]]:
    """The same batches from a single-process loader with the PIL reference tiler."""
    from transformers import AutoTokenizer

    from megatron_r1v.data.loader import PromptLoader
    from megatron_r1v.data.schema import load_records
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tiling import PILTiler, TilingConfig

    template = ChatTemplate(AutoTokenizer.from_pretrained(str(data / "tok")), TemplateConfig(tokens_per_tile=4))
    loader = PromptLoader(load_records(data / "prompts.jsonl", "prompts").records, template,
                          PILTiler(TilingConfig(image_size=56, max_tiles=4)), seed=7, dp_rank=dp_rank, dp_size=dp_size)
    steps = []
    for _ in range(STEPS):
        steps.append([{"id": i.record.id, "tiles": list(i.tiles_per_image), "prompt_ids": i.prompt_ids.tolist(),
                       "shape": list(i.pixel_values.shape),
                       "sha256": hashlib.sha256(np.ascontiguousarray(i.pixel_values.numpy()).tobytes()).hexdigest()}
                      for i in loader.next_batch(4)])
    return steps


def run(torchrun, data: Path, out: Path, tp: int, pp: int) -> list[dict]:
    torchrun(WORKER, 4, ["--data", str(data), "--tp", str(tp), "--pp", str(pp), "--steps", str(STEPS),
                         "--out", str(out)], timeout=900)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


def layout(steps: list[list[dict]]) -> list[list[dict]]:
    """What every rank needs: ids, tiles per image, prompt ids."""
    return [[{k: v for k, v in item.items() if k in ("id", "tiles", "prompt_ids")} for item in step] for step in steps]


def assert_bad_images_agree(ranks: list[dict]) -> None:
    """The truncated image: dropped at load time on every rank alike; at tiling time skipped
    on every rank (the other 2 prompts kept), or the same ImageError naming the file on every
    rank; no rank waits for another."""
    for r in ranks:
        assert r["skipped_at_load"] == 1 and r["kept_at_load"] == ranks[0]["kept_at_load"], r["rank"]
        assert len(r["kept_at_load"]) == 2
        assert r["bad"]["skip"]["skipped"] == 1 and len(r["bad"]["skip"]["kept"]) == 2, r["rank"]
        assert r["bad"] == ranks[0]["bad"]
        assert "truncated.png: cannot decode image" in r["bad"]["error"]["error"], r["bad"]


def test_tp2_pp2_one_rank_tiles_peers_receive_later_stage_opens_nothing(torchrun, data, tmp_path):
    ranks = run(torchrun, data, tmp_path, tp=2, pp=2)
    assert [(r["tp_rank"], r["pp_rank"], r["role"]) for r in ranks] == [
        (0, 0, "tile"), (1, 0, "receive"), (0, 1, "layout"), (1, 1, "layout")]
    assert ranks[0]["tiler_type"] == "DALITiler"  # data.tiler=auto with DALI installed
    assert ranks[0]["description"] == ("dali (r1v.internvl_tiles, 2 threads) on 1 rank per replica (tp 2 x pp 2): "
                                       "TP peers receive its tiles, later pipeline stages only tile counts")

    # Who opened image files: rank 0 decoded all 10 for the load-time check (it is the only
    # tiling rank), its probe image and every tiled file; no other rank opened one, in any
    # phase (headers included).
    assert ranks[0]["opened"]["load"] == 10 and ranks[0]["opened"]["steps"] >= 8 and ranks[0]["opened"]["bad"] > 0
    assert ranks[0]["opened"]["bad_load"] == 3  # prompts_bad.jsonl's 3 images
    for r in ranks[1:]:
        assert r["opened"] == {"load": 0, "build": 0, "steps": 0, "bad_load": 0, "bad": 0}, r["rank"]
    assert all(r["checked"] == 10 and r["records"] == 10 for r in ranks)

    # The items: identical prompt ids and tile counts everywhere; rank 0's and rank 1's pixels
    # are the PIL reference's bit for bit; the second stage holds [tiles, 0] placeholders.
    reference = reference_items(data)
    assert sum(len(step) for step in reference) == 4 * STEPS
    for r in ranks:
        assert layout(r["steps"]) == layout(reference), r["rank"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == reference
    for r in ranks[2:]:
        for step, ref in zip(r["steps"], reference):
            assert [i["shape"] for i in step] == [[sum(i["tiles"]), 0] for i in ref]
            assert all(i["sha256"] is None for i in step)
    assert_bad_images_agree(ranks)


def test_tp2_dp2_each_replica_tiles_its_share(torchrun, data, tmp_path):
    """Two replicas: ranks 0 and 2 tile (and split the load-time check), ranks 1 and 3 receive."""
    ranks = run(torchrun, data, tmp_path, tp=2, pp=1)
    assert [(r["tp_rank"], r["dp_rank"], r["role"]) for r in ranks] == [
        (0, 0, "tile"), (1, 0, "receive"), (0, 1, "tile"), (1, 1, "receive")]
    assert [r["opened"]["load"] for r in ranks] == [5, 0, 5, 0]  # 10 images, every 2nd one each
    assert [r["opened"]["bad_load"] for r in ranks] == [2, 0, 1, 0]  # 3 images
    assert ranks[1]["opened"] == ranks[3]["opened"] == {"load": 0, "build": 0, "steps": 0, "bad_load": 0, "bad": 0}
    for replica in (0, 1):
        reference = reference_items(data, dp_rank=replica, dp_size=2)
        assert sum(len(step) for step in reference) == 2 * STEPS
        assert ranks[2 * replica]["steps"] == ranks[2 * replica + 1]["steps"] == reference, replica
    assert_bad_images_agree(ranks)
