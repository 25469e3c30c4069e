"""The perception family of the synthetic set: answers re-derived from the pixels, images cut
into whole tiles and one shape per 28-px cell (a visual token of the tiny model's tiles)."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_r1v.data.schema import load_records
from megatron_r1v.data.synthetic import PALETTE, generate_dataset, make_sample
from megatron_r1v.data.synthetic_perception import CELL, GRIDS, MAX_COUNT
from megatron_r1v.data.tiling import TilingConfig, choose_grid


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def perception(tmp_path_factory):
    out = tmp_path_factory.mktemp("perception") / "set"
    return out, generate_dataset(out, num=90, seed=5, family="perception")


def _cell_contents(image: np.ndarray, background: tuple) -> list[tuple[int, int, tuple, str]]:
    """(row, col, colour, shape) of every non-empty cell, read from the pixels alone: the colour
    is the cell's one non-background colour; the shape from how much of its bounding box it fills
    (square 1, circle ~pi/4, triangle ~1/2)."""
    found = []
    for r in range(image.shape[0] // CELL):
        for c in range(image.shape[1] // CELL):
            cell = image[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            ink = np.any(cell != background, axis=-1)
            if not ink.any():
                continue
            colours = {tuple(p) for p in cell[ink]}
            assert len(colours) == 1, f"cell ({r}, {c}) holds {colours}"
            ys, xs = np.nonzero(ink)
            fill = ink.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            shape = "square" if fill > 0.97 else "circle" if fill > 0.68 else "triangle"
            found.append((r, c, colours.pop(), shape))
    return found


def test_answers_are_recomputed_from_the_pixels(perception):
    out, summary = perception
    assert summary["family"] == "perception" and summary["tasks"] == {"color": 30, "count": 30, "shape": 30}
    names = {v: k for k, v in PALETTE.items()}
    for prompt, meta in zip(jsonl(out / "prompts.jsonl"), jsonl(out / "metadata.jsonl"), strict=True):
        image = np.asarray(Image.open(out / prompt["images"][0]).convert("RGB"))
        cells = _cell_contents(image, tuple(meta["background"]))
        assert len(cells) == len(meta["objects"]) >= 1
        if meta["task"] == "count":
            assert prompt["answer"] == str(len(cells)) and prompt["answer_type"] == "number"
            assert 1 <= len(cells) <= MAX_COUNT
        else:
            (_, _, colour, shape), = cells
            assert prompt["answer"] == (names[colour] if meta["task"] == "color" else shape)
            assert prompt["answer_type"] == "text"


def test_images_are_whole_tiles_and_cells_are_tokens(perception):
    """Every image tiles into its own aspect's grid of 56-px tiles without resizing (up to 4
    tiles), and each shape lies inside one 28-px cell, 2 px or more from its edges."""
    out, _ = perception
    grids = Counter()
    for meta in jsonl(out / "metadata.jsonl"):
        w, h = meta["width"], meta["height"]
        grids[(w // CELL, h // CELL)] += 1
        assert w % 56 == 0 and h % 56 == 0
        cols, rows = choose_grid(w, h, TilingConfig(image_size=56, max_tiles=4))
        assert (cols * 56, rows * 56) == (w, h)
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert x0 // CELL == x1 // CELL and y0 // CELL == y1 // CELL
            assert x0 % CELL >= 2 and y0 % CELL >= 2 and CELL - 1 - x1 % CELL >= 2 and CELL - 1 - y1 % CELL >= 2
    assert set(grids) <= set(GRIDS) and len(grids) >= 4


def test_records_validate_and_answers_vary(perception):
    out, _ = perception
    for kind in ("prompts", "preferences", "sft"):
        assert len(load_records(out / f"{kind}.jsonl", kind).records) == 90
    by_task = {}
    for prompt, meta in zip(jsonl(out / "prompts.jsonl"), jsonl(out / "metadata.jsonl")):
        by_task.setdefault(meta["task"], Counter())[prompt["answer"]] += 1
    assert len(by_task["color"]) >= 5 and len(by_task["shape"]) == 3 and len(by_task["count"]) >= 4
    chains = [json.loads(line)["messages"][1]["content"] for line in (out / "sft.jsonl").read_text().splitlines()]
    assert all(c.startswith("<think>\nThe shapes are ") or c.startswith("<think>\nThere is one shape: a ")
               for c in chains)


def test_families_have_their_own_streams():
    """Adding the family moved no sample of the reasoning family, and the families differ."""
    reasoning = make_sample(3, 7)
    assert reasoning.task == "digit_sum" and reasoning == make_sample(3, 7, "reasoning")
    assert make_sample(3, 7, "perception").task == "shape"
    with pytest.raises(ValueError, match="family: 'vision' is not one of reasoning, perception"):
        make_sample(3, 7, "vision")
