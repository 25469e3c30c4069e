"""Synthetic visual-reasoning set: deterministic, valid, answers re-derived from pixels."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from megatron_r1v.data import synthetic
from megatron_r1v.data.schema import load_records, read_records
from megatron_r1v.data.synthetic import DIGIT_SEGMENTS, PALETTE, generate_dataset, segment_boxes

REPO = Path(__file__).resolve().parents[2]
SEGMENTS_TO_DIGIT = {frozenset(v): k for k, v in DIGIT_SEGMENTS.items()}


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "set"
    summary = generate_dataset(out, num=60, seed=11)
    return out, summary


def components(image: Image.Image, color: tuple[int, int, int]) -> int:
    """Connected regions of exactly ``color`` (shapes are drawn without anti-aliasing)."""
    image = image.copy()
    count = 0
    while True:
        hits = np.argwhere(np.all(np.asarray(image) == color, axis=-1))
        if len(hits) == 0:
            return count
        y, x = hits[0]
        ImageDraw.floodfill(image, (int(x), int(y)), (1, 2, 3), thresh=0)
        count += 1


def test_same_seed_same_bytes_other_seed_differs(tmp_path, dataset):
    generate_dataset(tmp_path / "a", num=12, seed=11)
    generate_dataset(tmp_path / "b", num=12, seed=11)
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert a == b and len(a) == 12 + 4 and "images/syn-000011.png" in a
    # Sample i depends on (seed, i) only: a smaller set is a prefix of a larger one.
    big = tree(dataset[0])
    assert all(big[name] == data for name, data in a.items() if name.startswith("images/"))
    assert big["prompts.jsonl"].startswith(a["prompts.jsonl"]) and big["sft.jsonl"].startswith(a["sft.jsonl"])
    generate_dataset(tmp_path / "c", num=12, seed=12)
    c = tree(tmp_path / "c")
    assert c["prompts.jsonl"] != a["prompts.jsonl"]
    assert sum(c[f"images/syn-{i:06d}.png"] != a[f"images/syn-{i:06d}.png"] for i in range(12)) == 12


def test_generated_files_validate_cleanly(dataset):
    out, summary = dataset
    prompts, problems = read_records(out / "prompts.jsonl", "prompts")
    assert problems == [] and len(prompts) == 60
    prefs = load_records(out / "preferences.jsonl", "preferences")
    assert prefs.skipped == 0 and len(prefs.records) == 60
    sft = load_records(out / "sft.jsonl", "sft")
    assert sft.skipped == 0 and [len(r.messages) for r in sft.records] == [2, 2, 2, 4] * 15
    chosen = {r.id: r.chosen for r in prefs.records}
    assert all(r.messages[1].content == chosen[r.id] for r in sft.records)  # the correct, well-formatted reply
    assert summary["tasks"] == {"count": 20, "digit_sum": 20, "majority_color": 20}
    assert {p.answer_type for p in prompts} == {"number", "choice"}
    for p in prompts:
        assert p.question.count("<image>") == 1 and p.images == (out / "images" / f"{p.id}.png",)
        if p.answer_type == "choice":
            # The question lists the options with their letters; the answer is a letter.
            assert [f"{chr(65 + i)}. {c}" in p.question for i, c in enumerate(p.choices)] == [True] * 4
            assert p.answer in "ABCD" and len(p.answer) == 1


def test_answers_are_recomputed_from_the_pixels(dataset):
    out, _ = dataset
    prompts = {p["id"]: p for p in jsonl(out / "prompts.jsonl")}
    checked = {"count": 0, "digit_sum": 0, "majority_color": 0}
    for meta in jsonl(out / "metadata.jsonl"):
        prompt = prompts[meta["id"]]
        image = Image.open(out / prompt["images"][0]).convert("RGB")
        assert image.size == (meta["width"], meta["height"])
        pixels = np.asarray(image)
        # Every drawn pixel lies in a listed object's box, so the metadata hides nothing.
        inside = np.zeros(pixels.shape[:2], bool)
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert not inside[y0 - 2:y1 + 3, x0 - 2:x1 + 3].any(), "objects closer than 2 px"
            inside[y0:y1 + 1, x0:x1 + 1] = True
        assert not np.any(np.any(pixels != meta["background"], axis=-1) & ~inside)

        if meta["task"] == "count":
            (name,) = [c for c in PALETTE if re.search(rf"\b{c}\b", prompt["question"])]
            assert components(image, PALETTE[name]) == int(prompt["answer"]) >= 1
        elif meta["task"] == "digit_sum":
            digits = []
            for obj in meta["objects"]:
                lit = frozenset(k for k, (a, b, c, d) in segment_boxes(obj["box"], obj["thickness"]).items()
                                if tuple(pixels[(b + d) // 2, (a + c) // 2]) == tuple(obj["color"]))
                digits.append(SEGMENTS_TO_DIGIT[lit])
            assert len(digits) >= 2 and sum(digits) == int(prompt["answer"])
        else:
            counts = [components(image, PALETTE[c]) for c in prompt["choices"]]
            assert sorted(counts)[-1] > sorted(counts)[-2], counts  # a unique majority
            assert "ABCD"[int(np.argmax(counts))] == prompt["answer"]
        checked[meta["task"]] += 1
    assert checked == {"count": 20, "digit_sum": 20, "majority_color": 20}


def test_sizes_and_aspect_ratios_vary(dataset):
    metas = jsonl(dataset[0] / "metadata.jsonl")
    widths, heights = np.array([m["width"] for m in metas]), np.array([m["height"] for m in metas])
    ratios = widths / heights
    assert widths.min() >= 64 and heights.min() >= 64 and widths.max() <= 900 and heights.max() <= 900
    assert widths.min() < 150 and widths.max() > 600 and heights.min() < 150 and heights.max() > 600
    assert (ratios >= 3.9).any() and (ratios <= 0.34).any() and (np.abs(ratios - 1) < 0.02).any()
    assert len(set(zip(widths.tolist(), heights.tolist()))) > 50


def test_preference_pairs_are_r1_style_and_scored(dataset):
    out, _ = dataset
    answers = {p["id"]: p["answer"] for p in jsonl(out / "prompts.jsonl")}
    flaws = set()
    for pair in jsonl(out / "preferences.jsonl"):
        answer = answers[pair["id"]]
        assert re.fullmatch(r"<think>\n[^<]+\n</think>\n\nThe answer is \\boxed\{" + answer + r"\}\.", pair["chosen"])
        assert 15 <= pair["chosen_score"] < 17
        # The rejected score's band says what is wrong with the response.
        band = int(pair["rejected_score"] // 5) * 5
        assert pair["rejected_score"] - band < 2
        rejected = pair["rejected"]
        if band == 5:
            assert "</think>" in rejected and f"\\boxed{{{answer}}}" not in rejected
        elif band == 10:
            # Right answer, broken think block: missing, or never closed.
            assert f"\\boxed{{{answer}}}" in rejected
            assert not rejected.startswith("<think>\n") or "</think>" not in rejected
        else:
            assert band == 0 and "\\boxed" not in rejected
        flaws.add(band)
        assert pair["chosen_score"] - pair["rejected_score"] >= 3
        assert pair["prompt"].startswith("<image>\n") and pair["images"] == [f"images/{pair['id']}.png"]
    assert flaws == {0, 5, 10}


def test_refuses_non_empty_output_and_force_replaces(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    generate_dataset(out, num=3, seed=0)  # an empty folder is fine
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"output directory .*set exists and is not empty; pass --force"):
        generate_dataset(out, num=3, seed=1)
    assert (out / "mine.txt").read_text() == "keep"
    generate_dataset(out, num=4, seed=1, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["images", "metadata.jsonl", "preferences.jsonl", "prompts.jsonl",
                                                     "sft.jsonl"]
    assert len(list((out / "images").iterdir())) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    with pytest.raises(ValueError, match="num: expected at least 1 sample, got 0"):
        generate_dataset(tmp_path / "none", num=0, seed=0)


def test_a_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    old = tmp_path / "old"
    generate_dataset(old, num=2, seed=0)
    before = tree(old)
    calls = []

    def failing_write(image, path):
        calls.append(path)
        if len(calls) % 3 == 0:  # the third image of each run
            raise OSError("disk full")
        image.save(path, format="PNG")

    monkeypatch.setattr(synthetic, "_write_png", failing_write)
    with pytest.raises(OSError, match="disk full"):
        generate_dataset(tmp_path / "new", num=5, seed=0)
    with pytest.raises(OSError, match="disk full"):
        generate_dataset(old, num=5, seed=0, force=True)
    assert len(calls) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no "new", no temporary folders
    assert tree(old) == before


def test_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "megatron_r1v.data.synthetic", "--out", str(tmp_path / "s"), "--num", "6",
           "--seed", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote 6 reasoning samples (2 count, 2 digit_sum, 2 majority_color) to "
                                  f"{tmp_path / 's'}")
    assert synthetic.main(["--out", str(tmp_path / "t"), "--num", "6", "--seed", "5"]) == 0
    assert tree(tmp_path / "s") == tree(tmp_path / "t")
    with pytest.raises(SystemExit) as info:
        synthetic.main(["--out", str(tmp_path / "s"), "--num", "6"])
    assert info.value.code == 2
    assert synthetic.main(["--out", str(tmp_path / "p"), "--num", "3", "--family", "perception"]) == 0
    assert [json.loads(line)["answer_type"] for line in (tmp_path / "p" / "prompts.jsonl").read_text().splitlines()
            ] == ["text", "text", "number"]
