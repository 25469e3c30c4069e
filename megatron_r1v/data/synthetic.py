"""A deterministic synthetic visual-reasoning set with answers that can be checked.

    python -m megatron_r1v.data.synthetic --out DIR --num N --seed S [--family reasoning|perception] [--force]

writes

    DIR/images/<id>.png     one image per sample
    DIR/prompts.jsonl       GRPO prompts (schema in ``megatron_r1v.data.schema``)
    DIR/preferences.jsonl   one MPO pair per prompt
    DIR/sft.jsonl           one SFT conversation per prompt: the question and the correct,
                            well-formatted response (every fourth with a second turn that
                            asks to check the answer, and its reply)
    DIR/metadata.jsonl      what each image holds (task, size, every object's colour and
                            box), so answers can be re-derived from the pixels

Two families of tasks. ``perception`` (``data/synthetic_perception.py``: the colour, shape
or number of big shapes on a grid sized for the tiny model's tiles) is what the quickstart
trains on. ``reasoning``, the default, has three tasks, in turn: ``count`` (how many shapes
of one colour; answer_type number), ``digit_sum`` (sum of seven-segment digits; number) and ``majority_color`` (which of
four colours is on the most shapes; choice, answered with the option's letter). Shapes
and digits sit in disjoint cells of a grid with a margin, so they never touch, and are
drawn without anti-aliasing in exact palette colours. Images are 64..900 pixels on each
side with aspect ratios from 1:3 to 4:1.

Sample ``i`` depends only on ``(family, seed, i)``: ``--num 10`` gives the first ten samples of
``--num 200``, and the files are byte-identical across runs (no timestamps in the PNGs).

Preferences: ``chosen`` is an R1-style response (``<think>\\n...\\n</think>\\n\\nThe answer
is \\boxed{A}.``) with the right answer; ``rejected`` has a wrong answer, or the right one
in a broken format (no think block, no \\boxed{}, unclosed </think>). Scores follow
``10 * correct + 5 * well_formatted + U[0, 2)`` (two decimals): chosen 15..17, a wrong
answer 5..7, a broken format 0..2 or 10..12, so reward-margin thresholds pick pairs apart.

The output appears whole or not at all: everything is written to a temporary folder
next to DIR, which is renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from megatron_r1v.atomic_dir import commit_directory

from .schema import CHOICE_LETTERS, IMAGE_PLACEHOLDER
from .synthetic_perception import PERCEPTION_TASKS, perception_grid, perception_task

TASKS = ("count", "digit_sum", "majority_color")
FAMILIES: dict[str, tuple[str, ...]] = {"reasoning": TASKS, "perception": PERCEPTION_TASKS}
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 20), "purple": (140, 60, 190), "orange": (245, 130, 30),
}
DIGIT_COLORS: tuple[tuple[int, int, int], ...] = ((20, 20, 20), (30, 40, 120), (120, 30, 30), (20, 90, 40))
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (246, 246, 246), (250, 247, 238), (240, 245, 252))
SHAPES = ("circle", "square", "triangle")
# width:height; 4:1 and 1:3 are the extremes the tiling code must handle.
ASPECTS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (16, 9), (2, 1), (4, 1), (1, 2), (1, 3))
MIN_SIDE, MAX_SIDE = 64, 900
# Seven-segment layout: a top, b top right, c bottom right, d bottom, e bottom left,
# f top left, g middle.
DIGIT_SEGMENTS: dict[int, str] = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}
_FORMAT = re.compile(r"<think>\n.+?\n</think>\n\n.*\\boxed\{[^{}]+\}", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]+)\}")


def segment_boxes(box: Sequence[int], thickness: int) -> dict[str, tuple[int, int, int, int]]:
    """Inclusive pixel boxes of the seven segments of a digit drawn in ``box``.

    Horizontal segments stay between the vertical ones, so no two segments share a
    pixel and the centre of each box is lit exactly when its segment is.
    """
    x0, y0, x1, y1 = box
    w, h, t = x1 - x0 + 1, y1 - y0 + 1, thickness
    half, mid = h // 2, h // 2 - t // 2
    rel = {
        "a": (t, 0, w - t - 1, t - 1), "b": (w - t, 0, w - 1, half - 1), "c": (w - t, half, w - 1, h - 1),
        "d": (t, h - t, w - t - 1, h - 1), "e": (0, half, t - 1, h - 1), "f": (0, 0, t - 1, half - 1),
        "g": (t, mid, w - t - 1, mid + t - 1),
    }
    return {k: (x0 + a, y0 + b, x0 + c, y0 + d) for k, (a, b, c, d) in rel.items()}


def response_score(response: str, answer: str, noise: float) -> float:
    """10 * correct + 5 * well_formatted + noise, the scale the preference scores use."""
    boxed = _BOXED.findall(response)
    correct = bool(boxed) and boxed[-1].strip() == answer
    # Noise is cut (not rounded) to two decimals so it stays below 2 and the bands never meet.
    noise = math.floor(float(noise) * 100) / 100
    return round(10.0 * correct + 5.0 * bool(_FORMAT.fullmatch(response.strip().rstrip("."))) + noise, 2)


@dataclass
class Sample:
    """One generated sample: what to draw (``objects``, also written as metadata) and its texts."""

    id: str
    task: str
    width: int
    height: int
    background: tuple[int, int, int]
    objects: list[dict] = field(default_factory=list)
    question: str = ""
    answer: str = ""
    choices: Optional[list[str]] = None
    reasoning: str = ""
    wrong_answer: str = ""
    answer_type: str = "number"


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    ratio = aw / ah
    lo, hi = max(MIN_SIDE, MIN_SIDE / ratio), min(MAX_SIDE, MAX_SIDE / ratio)
    height = int(rng.integers(int(np.ceil(lo)), int(hi) + 1))
    return min(MAX_SIDE, max(MIN_SIDE, round(height * ratio))), height


def _cells(rng: np.random.Generator, width: int, height: int) -> tuple[int, list[tuple[int, int]]]:
    """Cell size and the top-left corners of a grid centred in the image (>= 9 cells)."""
    short = min(width, height)
    size = int(np.clip(rng.integers(short // 6, short // 3 + 1), 20, 140))
    cols, rows = width // size, height // size
    ox, oy = (width - cols * size) // 2, (height - rows * size) // 2
    return size, [(ox + c * size, oy + r * size) for r in range(rows) for c in range(cols)]


def _place(rng: np.random.Generator, cell: tuple[int, int], size: int, min_frac: float, aspect: float = 1.0):
    """An inclusive box inside ``cell``, keeping a margin so neighbours never touch."""
    margin = max(2, size // 10)
    room = size - 2 * margin
    h = int(rng.integers(max(8, int(size * min_frac)), room + 1))
    w = max(5, round(h * aspect))
    x0 = cell[0] + margin + int(rng.integers(0, room - w + 1))
    y0 = cell[1] + margin + int(rng.integers(0, room - h + 1))
    return [x0, y0, x0 + w - 1, y0 + h - 1]


def _pick_cells(rng: np.random.Generator, cells: list, n: int) -> list[tuple[int, int]]:
    # Sorted: objects are listed (and described in the reasoning) in reading order.
    return [cells[i] for i in sorted(rng.choice(len(cells), size=n, replace=False))]


def _shapes(rng: np.random.Generator, cells: list, size: int, colors: list[str]) -> list[dict]:
    """One shape per colour name, colours shuffled over reading-order cells."""
    colors = [colors[i] for i in rng.permutation(len(colors))]
    return [{"shape": SHAPES[rng.integers(len(SHAPES))], "color": color, "box": _place(rng, cell, size, 0.5)}
            for cell, color in zip(_pick_cells(rng, cells, len(colors)), colors)]


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _count_task(s: Sample, rng: np.random.Generator, cells: list, size: int) -> None:
    target = list(PALETTE)[rng.integers(len(PALETTE))]
    others = [c for c in PALETTE if c != target]
    k = int(rng.integers(1, min(6, len(cells) - 1) + 1))
    d = int(rng.integers(1, min(6, len(cells) - k) + 1))
    s.objects = _shapes(rng, cells, size, [target] * k + [others[i] for i in rng.integers(len(others), size=d)])
    phrasing = ("How many {c} shapes are there in the image?", "Count the {c} shapes in the image.",
                "How many shapes in the image are {c}?")[rng.integers(3)]
    s.question = f"{IMAGE_PLACEHOLDER}\n{phrasing.format(c=target)} Answer with a single number."
    s.answer = str(k)
    found = [f"a {target} {o['shape']}" for o in s.objects if o["color"] == target]
    rest = sorted({o["color"] for o in s.objects if o["color"] != target})
    total = f"is 1 {target} shape" if k == 1 else f"are {k} {target} shapes"
    s.reasoning = (f"I need the {target} shapes. Reading the image row by row, I find {_and_list(found)}. "
                   f"The {_and_list(rest)} ones do not count. So there {total}.")
    s.wrong_answer = str(k + 1 if k == 1 or rng.random() < 0.5 else k - 1)


def _digit_task(s: Sample, rng: np.random.Generator, cells: list, size: int) -> None:
    n = int(rng.integers(2, min(5, len(cells)) + 1))
    for cell in _pick_cells(rng, cells, n):
        box = _place(rng, cell, size, 0.6, aspect=0.6)
        thickness = max(2, round((box[3] - box[1] + 1) * 0.14))
        color = DIGIT_COLORS[rng.integers(len(DIGIT_COLORS))]
        s.objects.append({"digit": int(rng.integers(10)), "color": list(color), "box": box, "thickness": thickness})
    digits = [o["digit"] for o in s.objects]
    total = sum(digits)
    s.question = (f"{IMAGE_PLACEHOLDER}\nWhat is the sum of all the digits drawn in the image? "
                  "Answer with a single number.")
    s.answer = str(total)
    steps, running = [], digits[0]
    for digit in digits[1:]:
        steps.append(f"{running} + {digit} = {running + digit}")
        running += digit
    s.reasoning = (f"Reading left to right, top to bottom, the digits are {_and_list([str(x) for x in digits])}. "
                   f"Adding them up: {', '.join(steps)}. The sum is {total}.")
    s.wrong_answer = str(total + int(rng.choice([-2, -1, 1, 2])) if total >= 2 else total + 1)


def _majority_task(s: Sample, rng: np.random.Generator, cells: list, size: int) -> None:
    names = list(PALETTE)
    choices = [names[i] for i in rng.permutation(len(names))[:4]]
    top = int(rng.integers(4))
    most = int(rng.integers(2, min(6, len(cells) // 2) + 1))
    counts = [int(x) for x in rng.integers(0, most, size=4)]
    counts[top] = most
    while sum(counts) > len(cells):  # trim the runners-up until everything fits
        runner = max((i for i in range(4) if i != top), key=lambda i: counts[i])
        counts[runner] -= 1
    s.objects = _shapes(rng, cells, size, [c for c, n in zip(choices, counts) for _ in range(n)])
    s.choices = choices
    options = "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    s.question = (f"{IMAGE_PLACEHOLDER}\nWhich color do most of the shapes in the image have?\n{options}\n"
                  "Answer with the letter of the correct option.")
    s.answer = CHOICE_LETTERS[top]
    tally = ", ".join(f"{c} {n}" for c, n in zip(choices, counts))
    s.reasoning = (f"Counting the shapes of each option's color: {tally}. {choices[top].capitalize()} has the "
                   f"most, {most}, and {choices[top]} is option {s.answer}.")
    s.wrong_answer = CHOICE_LETTERS[int(rng.choice([i for i in range(4) if i != top]))]
    s.answer_type = "choice"


def make_sample(seed: int, index: int, family: str = "reasoning") -> Sample:
    """Sample ``index`` of ``family``'s set for ``seed`` (pure: no files)."""
    if family not in FAMILIES:
        raise ValueError(f"family: {family!r} is not one of {', '.join(FAMILIES)}")
    tasks = FAMILIES[family]
    if family == "perception":
        # Its own stream (a third seed word), so the reasoning family's samples never move.
        rng = np.random.default_rng([seed, index, 2])
        width, height, cells = perception_grid(rng)
        sample = Sample(f"syn-{index:06d}", tasks[index % len(tasks)], width, height,
                        BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
        perception_task(sample, rng, cells, list(PALETTE), SHAPES)
        sample.answer_type = "number" if sample.task == "count" else "text"
        return sample
    rng = np.random.default_rng([seed, index])
    width, height = _image_size(rng)
    sample = Sample(f"syn-{index:06d}", tasks[index % len(tasks)], width, height,
                    BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    size, cells = _cells(rng, width, height)
    {"count": _count_task, "digit_sum": _digit_task, "majority_color": _majority_task}[sample.task](
        sample, rng, cells, size)
    return sample


def render(sample: Sample) -> Image.Image:
    image = Image.new("RGB", (sample.width, sample.height), sample.background)
    draw = ImageDraw.Draw(image)
    for obj in sample.objects:
        x0, y0, x1, y1 = obj["box"]
        if "digit" in obj:
            for segment in DIGIT_SEGMENTS[obj["digit"]]:
                draw.rectangle(segment_boxes(obj["box"], obj["thickness"])[segment], fill=tuple(obj["color"]))
            continue
        color = PALETTE[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)
    return image


def _responses(sample: Sample, rng: np.random.Generator) -> tuple[str, str]:
    chosen = f"<think>\n{sample.reasoning}\n</think>\n\nThe answer is \\boxed{{{sample.answer}}}."
    flaw = ("wrong", "wrong", "no_think", "no_box", "unclosed")[rng.integers(5)]
    if flaw == "wrong":
        return chosen, (f"<think>\n{sample.reasoning.rsplit('.', 2)[0]}. I am not sure, so I estimate.\n</think>\n\n"
                        f"The answer is \\boxed{{{sample.wrong_answer}}}.")
    if flaw == "no_think":
        return chosen, f"The answer is \\boxed{{{sample.answer}}}."
    if flaw == "no_box":
        return chosen, f"<think>\n{sample.reasoning}\n</think>\n\nThe answer is {sample.answer}."
    return chosen, f"<think>\n{sample.reasoning}\n\nThe answer is \\boxed{{{sample.answer}}}."


def _records(sample: Sample, seed: int, index: int) -> tuple[dict, dict, dict, dict]:
    image = f"images/{sample.id}.png"
    prompt = {"id": sample.id, "images": [image], "question": sample.question, "answer": sample.answer,
              "answer_type": sample.answer_type}
    if sample.choices:
        prompt["choices"] = sample.choices
    # Its own stream, so changing the response wording never moves the images.
    rng = np.random.default_rng([seed, index, 1])
    chosen, rejected = _responses(sample, rng)
    noise = rng.random(2) * 2.0
    preference = {"id": sample.id, "images": [image], "prompt": sample.question, "chosen": chosen,
                  "rejected": rejected, "chosen_score": response_score(chosen, sample.answer, noise[0]),
                  "rejected_score": response_score(rejected, sample.answer, noise[1])}
    messages = [{"role": "user", "content": sample.question}, {"role": "assistant", "content": chosen}]
    if index % 4 == 3:  # all three tasks get second turns
        messages += [{"role": "user", "content": "Check your answer once more and state it again."},
                     {"role": "assistant", "content": f"<think>\nChecking again: {sample.reasoning}\n</think>\n\n"
                                                      f"The answer is \\boxed{{{sample.answer}}}."}]
    sft = {"id": sample.id, "images": [image], "messages": messages}
    meta = {"id": sample.id, "task": sample.task, "width": sample.width, "height": sample.height,
            "background": list(sample.background), "objects": sample.objects}
    return prompt, preference, sft, meta


def read_jsonl(path: Union[str, Path]) -> list[dict]:
    """One of a set's JSONL files (metadata.jsonl, prompts.jsonl, ...) as dicts; a missing
    file or a line that is not JSON is an error naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON: {err}") from None
    return rows


def _write_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")  # PIL adds no time chunk unless asked: deterministic bytes


def generate_dataset(out_dir: Union[str, Path], num: int, seed: int, *, force: bool = False,
                     family: str = "reasoning") -> dict:
    """Writes ``num`` samples of ``family`` to ``out_dir`` (module docstring); returns a summary."""
    out = Path(out_dir)
    if family not in FAMILIES:
        raise ValueError(f"family: {family!r} is not one of {', '.join(FAMILIES)}")
    if num < 1:
        raise ValueError(f"num: expected at least 1 sample, got {num}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output directory {out} exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "images").mkdir(parents=True)
    tasks: Counter = Counter()
    widths, heights = [], []
    try:
        lines: dict[str, list[str]] = {"prompts.jsonl": [], "preferences.jsonl": [], "sft.jsonl": [],
                                       "metadata.jsonl": []}
        for index in range(num):
            sample = make_sample(seed, index, family)
            _write_png(render(sample), tmp / "images" / f"{sample.id}.png")
            for name, record in zip(lines, _records(sample, seed, index)):
                lines[name].append(json.dumps(record, ensure_ascii=False))
            tasks[sample.task] += 1
            widths.append(sample.width)
            heights.append(sample.height)
        for name, rows in lines.items():
            (tmp / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
        commit_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    ratios = [w / h for w, h in zip(widths, heights)]
    return {"out": str(out), "num": num, "seed": seed, "family": family, "tasks": dict(sorted(tasks.items())),
            "width": [min(widths), max(widths)], "height": [min(heights), max(heights)],
            "aspect_ratio": [round(min(ratios), 3), round(max(ratios), 3)]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_r1v.data.synthetic",
                                     description="Writes a deterministic synthetic visual-reasoning set.")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--num", type=int, default=200, help="number of samples (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--family", choices=list(FAMILIES), default="reasoning",
                        help="task family (module docstring; default reasoning)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    try:
        summary = generate_dataset(args.out, args.num, args.seed, force=args.force, family=args.family)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    tasks = ", ".join(f"{n} {t}" for t, n in summary["tasks"].items())
    print(f"wrote {summary['num']} {args.family} samples ({tasks}) to {summary['out']}: images/, prompts.jsonl, "
          f"preferences.jsonl, sft.jsonl, metadata.jsonl; widths {summary['width'][0]}..{summary['width'][1]}, "
          f"heights {summary['height'][0]}..{summary['height'][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
