"""evaluate.formats: public benchmark files (written by tests/eval_files.py) -> EvalItems, and
every malformed case reported as FILE:LINE / FILE:row N with the field."""

import json
import logging
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from eval_files import (  # tests/ is on sys.path (pytest.ini: pythonpath)
    Written, encode, make_image, write_aime_jsonl, write_mathverse_json, write_mathverse_parquet,
    write_mathvista_json, write_mathvista_parquet, write_mmmu_parquet, write_olympiadbench_json,
    write_olympiadbench_parquet, write_pope_parquet, write_project_jsonl)
from megatron_r1v.data.images import EmbeddedImage
from megatron_r1v.data.tiling import PILTiler, TilingConfig
from megatron_r1v.evaluate.formats import BENCHMARKS, BenchmarkDataError, read_benchmark
from megatron_r1v.evaluate.formats.mathverse import parse_options
from megatron_r1v.evaluate.items import EvalItem
from megatron_r1v.evaluate.scoring import score_response

TILER = PILTiler(TilingConfig(image_size=56, max_tiles=4))


# --- helpers --------------------------------------------------------------------------------


def check_items(items: list[EvalItem], written: Written) -> None:
    """Ids in file order, golds, kinds, categories, choices, image counts and placeholders."""
    assert [item.id for item in items] == list(written.answers)
    for item in items:
        assert item.answers == written.answers[item.id], item.id
        assert item.answer_kind == written.kinds[item.id], item.id
        assert item.category == written.categories[item.id], item.id
        assert item.choices == written.choices[item.id], item.id
        assert len(item.images) == len(written.images[item.id]), item.id
        assert item.question.count("<image>") in (0, len(item.images)), item.id
        assert item.source.startswith(str(written.path)), item.source


def check_pixels(items: list[EvalItem], written: Written, ref_folder: Path) -> None:
    """Every image tiles to the same pixels as its original saved to a file (PNG originals
    are saved anew by PIL; a JPEG's own bytes are written, as JPEG is lossy)."""
    ref_folder.mkdir(exist_ok=True)
    for item in items:
        refs = []
        for k, (original, data) in enumerate(zip(written.images[item.id], written.encoded[item.id])):
            ref = ref_folder / f"{item.id.replace('/', '_')}_{k}"
            if data.startswith(b"\x89PNG"):
                original.save(ref.with_suffix(".png"))
                refs.append(ref.with_suffix(".png"))
            else:
                ref.with_suffix(".jpg").write_bytes(data)
                refs.append(ref.with_suffix(".jpg"))
            if isinstance(item.images[k], EmbeddedImage):
                assert item.images[k].data == data
        got, want = TILER.tile_files(item.images), TILER.tile_files(refs)
        for a, b in zip(got.images, want.images):
            assert a is not None and b is not None
            assert torch.equal(a.pixel_values, b.pixel_values), item.id


@pytest.fixture
def no_temp_files(tmp_path, monkeypatch):
    """A private temp folder for this process (other processes may use the shared one at
    the same time): the test asserts nothing was written to it."""
    private = tmp_path / "private-tmp"
    private.mkdir()
    monkeypatch.setenv("TMPDIR", str(private))
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    yield private
    assert tempfile.gettempdir() == str(private)
    assert list(private.iterdir()) == []


def listing(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def problems_of(name: str, path, **kwargs) -> BenchmarkDataError:
    with pytest.raises(BenchmarkDataError) as caught:
        read_benchmark(name, path, **kwargs)
    listed = [line for line in str(caught.value).split("\n  ")[1:] if not line.startswith("... and ")]
    assert listed == list(caught.value.problems[:20])
    return caught.value


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value, indent=2))


def edit_parquet(path: Path, edit) -> None:
    """Rows edited as dicts; columns whose values stay of the same type keep their type."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows), path)


# --- MathVista ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_query", [True, False])
def test_mathvista_json(tmp_path, no_temp_files, with_query):
    written = write_mathvista_json(tmp_path / "mathvista", 6, with_query=with_query)
    before = listing(tmp_path / "mathvista")
    items = read_benchmark("mathvista", written.path)
    check_items(items, written)
    check_pixels(items, written, tmp_path / "ref")
    assert listing(tmp_path / "mathvista") == before
    by_id = {item.id: item for item in items}
    assert by_id["1"].choices == ("3", "5", "7", "9") and by_id["1"].answers == ("A",)
    assert [by_id[i].precision for i in "123456"] == [None, None, 1, 2, None, None]
    assert by_id["4"].unit == "cm" and by_id["1"].unit is None
    assert all(isinstance(item.images[0], Path) and item.images[0].is_file() for item in items)
    assert by_id["2"].raw_question == "How many objects are in the picture 2?"
    assert by_id["2"].source == f"{written.path}:24"  # the line of the record's key
    if with_query:
        assert by_id["1"].question == "Hint: Please answer the question. (record 1)\n" \
                                      "Question: How many objects are in the picture 1?"
    else:
        assert by_id["1"].question.startswith("Hint: Please answer the question and provide the correct option letter")
        assert by_id["1"].question.endswith("Choices:\n(A) 3\n(B) 5\n(C) 7\n(D) 9")
        assert "an integer answer" in by_id["2"].question
        assert "one decimal place" in by_id["3"].question and "e.g., 1.2, 1.3, 1.4" in by_id["3"].question
        assert "two decimal places" in by_id["4"].question and "(Unit: cm)" in by_id["4"].question
        assert "Python list" in by_id["5"].question


def test_mathvista_parquet_embedded_images(tmp_path, no_temp_files):
    written = write_mathvista_parquet(tmp_path / "mathvista", 7)
    before = listing(tmp_path)
    items = read_benchmark("mathvista", written.path)
    check_items(items, written)
    assert all(isinstance(item.images[0], EmbeddedImage) for item in items)
    assert items[2].images[0].name == f"{written.path}:row 2:decoded_image"
    assert items[2].source == f"{written.path}:row 2" and items[2].precision == 1
    check_pixels(items, written, tmp_path / "ref")
    assert listing(tmp_path) - before == {"ref"} | {f"ref/{item.id}_0.png" for item in items}


# --- MMMU -----------------------------------------------------------------------------------


def test_mmmu_parquet(tmp_path, no_temp_files):
    written = write_mmmu_parquet(tmp_path / "mmmu", 3, 3)
    items = read_benchmark("mmmu", written.path)
    check_items(items, written)
    check_pixels(items, written, tmp_path / "ref")  # item 1's two images in column order
    first, second, number, several, word = items[0], items[1], items[3], items[4], items[5]
    assert first.question == (
        "Image 1: <image>\nImage 2: <image>\nQuestion: What is shown in <image 1> and <image 2>?\nOptions:\n"
        "A. a circle\nB. a square\nC. a triangle\nD. a star\nAnswer with the option's letter from the given choices.")
    assert second.question.startswith("<image>\nQuestion: What is shown in <image 1>?\nOptions:\nA. a circle")
    assert first.id == "validation_Art_Theory_1" and first.category == "Art_Theory"
    assert number.question.endswith("Question: What is shown in <image 1>?\n"
                                    "Answer the question using a single word, phrase or number.")
    assert (number.answer_kind, several.answers, word.answer_kind) == ("number", ("24/7", "3.429"), "text")
    # MMMU's own eval rounds numbers to 2 decimals; a word gold has no numbers to round.
    assert (number.precision, several.precision, word.precision, first.precision) == (2, 2, None, None)
    assert several.answer_kind == "expression"
    assert score_response(several, "r</think>\n\\boxed{3.43}").correct
    assert score_response(several, "r</think>\n\\boxed{24/7}").correct
    assert not score_response(several, "r</think>\n\\boxed{3.44}").correct
    assert first.raw_question == "What is shown in <image 1> and <image 2>?"


def test_mmmu_folder_and_pattern(tmp_path):
    write_mmmu_parquet(tmp_path / "MMMU", 1, 1, subject="Math")
    write_mmmu_parquet(tmp_path / "MMMU", 2, 0, subject="Art_Theory")
    write_mmmu_parquet(tmp_path / "MMMU", 1, 0, subject="Art_Theory", split="dev")
    # The download's root folder (dev and validation files side by side) is read as its validation split.
    items = read_benchmark("mmmu", tmp_path / "MMMU")
    assert [item.id for item in items] == ["validation_Art_Theory_1", "validation_Art_Theory_2",
                                           "validation_Math_1", "validation_Math_2"]
    assert items[-1].source == f"{tmp_path / 'MMMU' / 'Math' / 'validation-00000-of-00001.parquet'}:row 1"
    assert [item.category for item in items] == ["Art_Theory", "Art_Theory", "Math", "Math"]
    # A pattern reads what it matches; a folder without validation files reads all its parquet files.
    dev = read_benchmark("mmmu", tmp_path / "MMMU" / "*" / "dev-*.parquet")
    assert [item.id for item in dev] == ["dev_Art_Theory_1"]
    assert [i.id for i in read_benchmark("mmmu", tmp_path / "MMMU" / "Art_Theory" / "dev-00000-of-00001.parquet")
            ] == ["dev_Art_Theory_1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: a folder without .parquet files"):
        read_benchmark("mmmu", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        read_benchmark("mmmu", tmp_path / "MMMU" / "*" / "test-*.parquet")


def test_mmmu_problems(tmp_path):
    written = write_mmmu_parquet(tmp_path / "mmmu", 3, 2)

    def edit(rows):
        rows[0]["answer"] = "E"  # 4 options: A-D
        rows[1]["question"] = "Compare <image 1> with <image 3>."  # image_3 is null
        rows[2]["options"] = "['unclosed'"
        rows[3]["question_type"] = "short"
        rows[4]["id"] = "no-subject"

    edit_parquet(written.path, edit)
    error = problems_of("mmmu", written.path)
    at = f"{written.path}:row"
    assert error.problems == (
        f"{at} 0: answer: 'E' is not the letter of one of the 4 options (A-D)",
        f"{at} 1: image_3: the text mentions <image 3> but image_3 is null",
        f"{at} 2: options: not a Python list literal: \"['unclosed'\"",
        f"{at} 3: question_type: unknown value 'short'; expected one of 'multiple-choice', 'open'",
        f"{at} 4: id: 'no-subject' is not SPLIT_Subject_NUMBER (as 'validation_Art_Theory_12')",
    )


def test_missing_parquet_column(tmp_path):
    written = write_mmmu_parquet(tmp_path / "mmmu", 2, 0)
    pq.write_table(pq.read_table(written.path).drop_columns(["answer"]), written.path)
    error = problems_of("mmmu", written.path)
    assert len(error.problems) == 1  # once per file, not once per row
    assert error.problems[0].startswith(f"{written.path}: missing column(s) 'answer' (columns: id, question,")


# --- MathVerse ------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [write_mathverse_json, write_mathverse_parquet])
def test_mathverse(tmp_path, no_temp_files, writer):
    written = writer(tmp_path / "mathverse", 8)
    items = read_benchmark("mathverse", written.path)
    check_items(items, written)
    check_pixels(items, written, tmp_path / "ref")
    text_dominant, vision_only, text_only = items[0], items[1], items[2]
    assert text_dominant.question.startswith("According to the question shown in the image, please first conduct")
    assert text_dominant.raw_question.startswith("In the triangle, find angle B.")
    assert vision_only.choices == ("A", "B", "C", "D", "E") and vision_only.raw_question == ""
    assert text_only.images == () and text_only.category == "Text Only"
    assert all(len(item.images) == 1 for item in items if item.category != "Text Only")


def test_mathverse_option_parsing():
    assert parse_options("Find x.\nChoices:\nA:1\nB:2\nC: 3 cm\nD:4") == ("1", "2", "3 cm", "4")
    assert parse_options("Choices:\nA. red\nB. blue\n") == ("red", "blue")
    assert parse_options("Pick one.\n(A) 30°\n(B) 60°\n(C) 90°") == ("30°", "60°", "90°")
    assert parse_options("Choices:\nA:1\nC:2") is None  # not consecutive letters
    assert parse_options("") is None


# --- OlympiadBench --------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [write_olympiadbench_json, write_olympiadbench_parquet])
def test_olympiadbench(tmp_path, no_temp_files, caplog, writer):
    written = writer(tmp_path / "olympiad", 8)
    with caplog.at_level(logging.WARNING, logger="megatron_r1v.evaluate.formats.olympiadbench"):
        items = read_benchmark("olympiadbench", written.path)
    check_items(items, written)
    check_pixels(items, written, tmp_path / "ref")  # item 3's images in mention order
    assert written.skipped == 2 and len(items) == 6
    assert [r.getMessage() for r in caplog.records] == [
        f"{written.path}: skipped 2 theorem-proof question(s) (only open-ended questions with a final answer "
        f"are scored)"]
    numeric, expression, several = items[:3]
    assert numeric.tolerance == 0.01 and expression.tolerance is None
    assert numeric.question.startswith("Here is an open-ended problem from an international mathematics "
                                       "competition. Its answer is a numerical value.")
    assert "LaTeX" in numeric.question and 'So the final answer is \\boxed{answer}.' in numeric.question
    assert numeric.question.endswith("\n\nIn <image>, find the length.")
    assert expression.question.count("<image>") == 0 and len(expression.images) == 1  # not mentioned: in front
    assert several.question.endswith("Compare <image> with <image>; find both roots.")
    assert "several answers, each of them a numerical value" in several.question
    assert several.raw_question == "Compare <image_2> with <image_1>; find both roots."


def test_olympiadbench_labels_from_file_name_and_unit(tmp_path):
    written = write_olympiadbench_json(tmp_path, 3, name="OE_TO_physics_en_COMP.json", labels=False)
    items = read_benchmark("olympiadbench", written.path)
    check_items(items, written)
    assert {item.category for item in items} == {"physics_text-only"}
    assert all(item.unit == "m/s" for item in items)
    assert "international physics competition" in items[0].question
    assert "The answer is in m/s; leave the unit out of \\boxed{}." in items[0].question


def test_olympiadbench_problems(tmp_path):
    written = write_olympiadbench_json(tmp_path, 3)

    def edit(records):
        records[0]["error"] = "about 1%"
        records[1]["answer_type"] = "Vector"
        records[2]["is_multiple_answer"] = "yes"

    edit_json(written.path, edit)
    error = problems_of("olympiadbench", written.path)
    assert [p.split(": ", 1)[1] for p in error.problems] == [
        "error: expected non-negative numbers, got 'about 1%'",
        "answer_type: unknown type(s) 'Vector'; expected Numerical, Expression, Equation, Interval, Tuple, "
        "Need_human_evaluate (comma-separated for several answers)",
        "is_multiple_answer: expected a boolean, got string",
    ]
    assert error.problems[1].startswith(f"{written.path}:")


# --- AIME -----------------------------------------------------------------------------------


def test_aime_jsonl(tmp_path, no_temp_files):
    written = write_aime_jsonl(tmp_path, 4)
    items = read_benchmark("aime", written.path)
    check_items(items, written)
    assert items[0].question == ("Find the remainder when 1^1 is divided by 1000.\n"
                                 "Please reason step by step, and put your final answer within \\boxed{}.")
    assert items[0].images == () and items[0].source == f"{written.path}:1"


def test_aime_other_releases(tmp_path):
    # AI-MO/aimo-validation-aime: lower-case keys, the year in the url, string answers.
    path = tmp_path / "aimo.parquet"
    url = "https://artofproblemsolving.com/wiki/index.php/2022_AIME_I_Problems/Problem_{}"
    rows = [{"id": k, "problem": f"Problem {k}?", "solution": "...", "answer": a, "url": url.format(k)}
            for k, a in ((60, "33"), (61, "\\frac{1}{2}"))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    items = read_benchmark("aime", path)
    assert [(i.id, i.answers, i.answer_kind, i.category) for i in items] == [
        ("60", ("33",), "number", "2022"), ("61", ("\\frac{1}{2}",), "expression", "2022")]
    # A JSON list without ids: the line number is the id; no year anywhere: "aime".
    listed = tmp_path / "aime.json"
    listed.write_text('[\n  {"question": "One?", "answer": 1},\n  {"question": "Two?", "answer": 2.0}\n]\n')
    assert [(i.id, i.answers, i.category) for i in read_benchmark("aime", listed)] == [
        ("2", ("1",), "aime"), ("3", ("2",), "aime")]
    # A .json file holding JSON Lines (as datasets' to_json writes) is read as JSON Lines.
    lines = tmp_path / "lines.json"
    lines.write_text('{"idx": 7, "Question": "Seven?", "ANSWER": "7"}\n{"idx": 8, "Question": "Eight?", "ANSWER": 8}\n')
    assert [(i.id, i.source) for i in read_benchmark("aime", lines)] == [("7", f"{lines}:1"), ("8", f"{lines}:2")]
    listed.write_text('[{"question": "One?", "answer": 1}, "Two?"]')
    assert problems_of("aime", listed).problems == (f"{listed}:1: expected a JSON object, got string",)


# --- POPE -----------------------------------------------------------------------------------


def test_pope_parquet(tmp_path, no_temp_files):
    written = write_pope_parquet(tmp_path, 7)
    items = read_benchmark("pope", written.path)
    check_items(items, written)
    check_pixels(items, written, tmp_path / "ref")  # JPEG bytes decoded as the file would be
    assert items[0].question == "Is there a cat in the image 0? Please answer yes or no."
    assert items[0].images[0].data.startswith(b"\xff\xd8")
    assert items[0].images[0].data is items[2].images[0].data  # one image, three rows: kept once


def test_pope_jsonl(tmp_path):
    (tmp_path / "val2014").mkdir()
    make_image(1).save(tmp_path / "val2014" / "COCO_1.jpg")
    lines = [{"question_id": 1, "image": "val2014/COCO_1.jpg", "text": "Is there a dog?", "label": "Yes",
              "category": "random"},
             {"question_id": 1, "image": "val2014/COCO_1.jpg", "text": "Is there a car?", "label": "no",
              "category": "popular"}]
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = read_benchmark("pope", tmp_path / "pope.jsonl")
    assert [(i.id, i.answers, i.category) for i in items] == [("random/1", ("yes",), "random"),
                                                              ("popular/1", ("no",), "popular")]
    assert items[0].images == (tmp_path / "val2014" / "COCO_1.jpg",)
    lines[1]["label"] = "maybe"
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert problems_of("pope", tmp_path / "pope.jsonl").problems == (
        f"{tmp_path / 'pope.jsonl'}:2: label: expected 'yes' or 'no', got 'maybe'",)


# --- project --------------------------------------------------------------------------------


def test_project_jsonl(tmp_path, no_temp_files):
    written = write_project_jsonl(tmp_path, 4)
    items = read_benchmark("project", written.path)
    check_items(items, written)
    check_pixels(items, written, tmp_path / "ref")
    assert items[0].question == "<image>\nHow many dots?" and items[1].source == f"{written.path}:2"
    with written.path.open("a") as out:
        out.write('{"id": 9, "images": [], "question": "Q?", "answer": "A", "answer_type": "choice"}\n')
    (tmp_path / "images" / "1.png").unlink()
    assert problems_of("project", written.path).problems == (  # the schema's problems and missing images, by line
        f"{written.path}:2: images[0]: image '{tmp_path / 'images' / '1.png'}' of item '1' not found",
        f"{written.path}:5: missing field 'choices' (required when answer_type is 'choice')",
    )


# --- problems common to the formats ---------------------------------------------------------


def test_malformed_json_line_and_reading_to_the_end(tmp_path):
    written = write_aime_jsonl(tmp_path, 5)
    lines = written.path.read_text().splitlines()
    lines[1] = lines[1][:-3]  # line 2 cut short
    lines[3] = json.dumps({"ID": "2024-I-4", "Problem": "Four?"})  # line 4 without an answer
    written.path.write_text("\n".join(lines) + "\n")
    error = problems_of("aime", written.path)
    assert error.problems[0].startswith(f"{written.path}:2: invalid JSON at column ")
    assert error.problems[1] == f"{written.path}:4: answer: missing field"
    assert len(error.problems) == 2


def test_malformed_json_document(tmp_path):
    written = write_mathvista_json(tmp_path, 3)
    text = written.path.read_text()
    written.path.write_text(text.replace('"question_type": "free_form",', '"question_type": "free_form"', 1))
    error = problems_of("mathvista", written.path)
    (problem,) = error.problems
    line = text.splitlines().index(next(ln for ln in text.splitlines() if '"question_type": "free_form"' in ln)) + 2
    assert problem.startswith(f"{written.path}:{line}: invalid JSON at column ")


def test_mathvista_field_problems(tmp_path):
    written = write_mathvista_json(tmp_path, 6)

    def edit(records):
        records["1"]["answer"] = "11"  # not among the choices
        records["2"]["question_type"] = "essay"
        records["3"]["precision"] = "1"
        records["4"]["precision"] = 1.5
        records["5"]["question"] = 5
        records["6"]["query"] = "<|im_start|>system"

    edit_json(written.path, edit)
    (tmp_path / "images" / "2.png").unlink()
    error = problems_of("mathvista", written.path)
    messages = [p.split(": ", 1)[1] for p in error.problems]
    assert messages == [
        "answer: '11' is not one of the choices ['3', '5', '7', '9']",
        "question_type: unknown value 'essay'; expected one of 'multi_choice', 'free_form'",
        f"image: image 'images/2.png' of item '2' not found ({tmp_path / 'images' / '2.png'})",
        "precision: expected a number, got string",
        "precision: expected a non-negative whole number of decimals, got 1.5",
        "question: expected a string, got integer",
        "query: contains the special token(s) <|im_start|> as text",
    ]
    assert all(p.startswith(f"{written.path}:") for p in error.problems)


def test_duplicate_ids_name_both_places(tmp_path):
    written = write_aime_jsonl(tmp_path, 3)
    lines = written.path.read_text().splitlines()
    lines[2] = lines[2].replace("2024-I-3", "2024-I-1")
    written.path.write_text("\n".join(lines) + "\n")
    assert problems_of("aime", written.path).problems == (
        f"{written.path}:3: duplicate id '2024-I-1' (first at {written.path}:1)",)


def test_many_problems_are_counted(tmp_path):
    path = tmp_path / "aime.jsonl"
    path.write_text("".join(json.dumps({"id": k, "problem": "P?"}) + "\n" for k in range(25)))
    error = problems_of("aime", path)
    assert len(error.problems) == 25
    assert str(error).endswith(f"{path}:20: answer: missing field\n  ... and 5 more")


def test_unknown_benchmark_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="--benchmark: unknown benchmark 'mathvision'; expected one of " +
                       ", ".join(BENCHMARKS)):
        read_benchmark("mathvision", tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json: no such file or folder"):
        read_benchmark("mathvista", tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        read_benchmark("project", tmp_path / "nope.jsonl")
    for name, file in (("aime", "a.jsonl"), ("mathvista", "b.json"), ("project", "c.jsonl")):
        (tmp_path / file).write_text("\n  \n" if name != "mathvista" else "")
        assert problems_of(name, tmp_path / file).problems == (f"{tmp_path / file}: empty file",)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(BenchmarkDataError, match="no mathverse items to evaluate"):
        read_benchmark("mathverse", tmp_path / "list.json")
    (tmp_path / "bad.parquet").write_bytes(b"")
    assert problems_of("pope", tmp_path / "bad.parquet").problems[0].startswith(
        f"{tmp_path / 'bad.parquet'}: cannot read as parquet")
    (tmp_path / "data.csv").write_text("a,b\n")
    assert "unknown file type '.csv'" in problems_of("aime", tmp_path / "data.csv").problems[0]


def test_limit(tmp_path):
    written = write_aime_jsonl(tmp_path, 5)
    assert [item.id for item in read_benchmark("aime", written.path, limit=2)] == ["2024-I-1", "2024-I-2"]
    assert len(read_benchmark("aime", written.path, limit=50)) == 5
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="--limit"):
            read_benchmark("aime", written.path, limit=bad)
    with written.path.open("a") as out:  # a problem past the limit is still reported
        out.write("{oops\n")
    assert problems_of("aime", written.path, limit=1).problems[0].startswith(f"{written.path}:6: invalid JSON")


def test_parquet_cell_types(tmp_path):
    written = write_mathvista_parquet(tmp_path, 2)

    def edit(rows):
        rows[0]["decoded_image"] = {"bytes": b"", "path": "x.png"}
        rows[1]["decoded_image"] = None  # falls back to the image path, which does not exist
        rows[1]["precision"] = None

    edit_parquet(written.path, edit)
    assert problems_of("mathvista", written.path).problems == (
        f"{written.path}:row 0: decoded_image: expected encoded image bytes, got empty bytes",
        f"{written.path}:row 1: image: image 'images/2.png' of item '2' not found ({tmp_path / 'images' / '2.png'})",
    )
    # With the file beside it, the path is used.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "2.png").write_bytes(encode(make_image(1)))
    rows = pq.read_table(written.path).to_pylist()
    rows[0]["decoded_image"] = {"bytes": None, "path": "images/2.png"}
    pq.write_table(pa.Table.from_pylist(rows), written.path)
    items = read_benchmark("mathvista", written.path)
    assert items[0].images == items[1].images == (tmp_path / "images" / "2.png",)
    assert os.path.isabs(items[0].images[0])
