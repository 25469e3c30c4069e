"""The ``perception`` family of ``megatron_r1v.data.synthetic``: what a tiny model can learn to see.

Three tasks, in turn: ``color`` (the colour of the one shape; one of six words, answer_type
text), ``shape`` (circle, square or triangle; text) and ``count`` (how many shapes, 1..5;
number). The picture is a grid of 28-pixel cells, 2x2 to 4x4 (56..112 px a side, aspect 1:1,
2:1 or 1:2, plus 3:1 and 1:3 strips of 6x2 cells), with at most one shape per cell, filling
most of it. The sizes are chosen for the tiny R1V's 56-pixel tiles: every image tiles into
whole tiles without resizing (InternVL's dynamic tiling with up to 4 tiles picks the grid of
the same aspect), and a 28-pixel cell is the 2x2 patches of 14 pixels that the adapter's pixel
shuffle folds into one visual token. So each cell is one token of its tile, and reading the
image means telling what one token holds: a target a 2-layer ViT and a 4-layer decoder reach
in minutes on a CPU. The ``reasoning`` family (the default: counting among distractors,
seven-segment digit sums, majority colours, on 64..900 px images) is what a real model is for.

The reasoning chain names every shape in reading order ("a red circle, a blue square"), then
the answer, so supervised fine-tuning on it teaches the model to describe what it sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .schema import IMAGE_PLACEHOLDER

PERCEPTION_TASKS = ("color", "shape", "count")
CELL = 28  # pixels: one visual token of a 56-px tile after the 0.5 pixel shuffle
# (columns, rows) of cells: each a whole number of 56-px tiles, 1..3 tiles.
GRIDS: tuple[tuple[int, int], ...] = ((2, 2), (4, 2), (2, 4), (4, 4), (6, 2), (2, 6))
MAX_COUNT = 5


def perception_grid(rng: np.random.Generator) -> tuple[int, int, list[tuple[int, int]]]:
    """Image width, height and the top-left corners of its cells in reading order."""
    cols, rows = GRIDS[rng.integers(len(GRIDS))]
    return cols * CELL, rows * CELL, [(c * CELL, r * CELL) for r in range(rows) for c in range(cols)]


def _shape_in_cell(rng: np.random.Generator, cell: tuple[int, int], color: str, shapes: tuple[str, ...]) -> dict:
    """A shape of 20..24 px in its cell, at least 2 px from the cell's edges."""
    size = int(rng.integers(20, 25))
    x0 = cell[0] + int(rng.integers(2, CELL - size - 1))
    y0 = cell[1] + int(rng.integers(2, CELL - size - 1))
    return {"shape": shapes[rng.integers(len(shapes))], "color": color, "box": [x0, y0, x0 + size - 1, y0 + size - 1]}


def _describe(objects: list[dict]) -> str:
    names = [f"a {o['color']} {o['shape']}" for o in objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"There is one shape: {listed}." if len(objects) == 1 else f"The shapes are {listed}."


def perception_task(sample: Any, rng: np.random.Generator, cells: list, palette: list[str],
                    shapes: tuple[str, ...]) -> None:
    """Fills ``sample`` (``synthetic.Sample``: task already set) with objects, question, answer,
    reasoning and a wrong answer."""
    count = 1 if sample.task != "count" else int(rng.integers(1, min(MAX_COUNT, len(cells)) + 1))
    chosen = sorted(rng.choice(len(cells), size=count, replace=False))
    sample.objects = [_shape_in_cell(rng, cells[i], palette[rng.integers(len(palette))], shapes) for i in chosen]
    first = sample.objects[0]
    if sample.task == "color":
        sample.question = f"{IMAGE_PLACEHOLDER}\nWhat color is the shape in the image? Answer with one word."
        sample.answer = first["color"]
        conclusion = f"Its color is {first['color']}."
        wrong = [c for c in palette if c != sample.answer]
    elif sample.task == "shape":
        sample.question = f"{IMAGE_PLACEHOLDER}\nWhat shape is drawn in the image? Answer with one word."
        sample.answer = first["shape"]
        conclusion = f"It is a {first['shape']}."
        wrong = [s for s in shapes if s != sample.answer]
    else:
        sample.question = f"{IMAGE_PLACEHOLDER}\nHow many shapes are there in the image? Answer with a single number."
        sample.answer = str(count)
        conclusion = f"That is {count} shape{'s' if count > 1 else ''}."
        wrong = [str(k) for k in range(1, MAX_COUNT + 1) if k != count]
    sample.reasoning = f"{_describe(sample.objects)} {conclusion}"
    sample.wrong_answer = wrong[rng.integers(len(wrong))]
