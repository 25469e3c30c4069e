"""JSONL schemas: every malformed case gives its exact `FILE:LINE: message`."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from megatron_r1v.data.images import check_image
from megatron_r1v.data.schema import (
    DataError,
    PreferenceRecord,
    Problem,
    PromptRecord,
    load_records,
    read_records,
)
from megatron_r1v.data.validate import main as validate_main

REPO = Path(__file__).resolve().parents[2]
DROP = object()  # marks a field to leave out of a record


def png(path: Path, size=(4, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    png(tmp_path / "img.png")
    png(tmp_path / "b.png")
    return tmp_path


def prompt(**fields):
    record = {"id": "p1", "images": ["img.png"], "question": "<image>\nHow many?", "answer": "3",
              "answer_type": "number"}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not DROP}


def pref(**fields):
    record = {"id": "q1", "images": ["img.png"], "prompt": "How many?", "chosen": "<think>\nx\n</think>\n\n3",
              "rejected": "4", "chosen_score": 9.5, "rejected_score": 2}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not DROP}


def write(path: Path, *lines) -> Path:
    """Lines are dicts (dumped as JSON), str (written as is) or bytes (raw)."""
    data = b"".join((json.dumps(x).encode() if isinstance(x, dict) else x if isinstance(x, bytes) else x.encode())
                    + b"\n" for x in lines)
    path.write_bytes(data)
    return path


def problems(path, kind="prompts", **kwargs) -> list[str]:
    return [str(p) for p in read_records(path, kind, **kwargs)[1]]


def test_valid_records_are_typed_and_normalized(folder):
    sub = png(folder / "deep" / "c.png")
    path = write(folder / "p.jsonl",
                 prompt(id=7, answer=12, images=["img.png", str(sub)], question="<image> vs <image>"),
                 "",  # blank lines are ignored
                 "   ",
                 prompt(id="c", answer="B", answer_type="choice", choices=["red", "green"], images=[],
                        question="Which? A. red B. green"))
    (deep := folder / "deep" / "x.jsonl").write_text(json.dumps(prompt(images=["../img.png"])) + "\n")
    records, found = read_records(path, "prompts")
    assert found == []
    assert records == [
        PromptRecord("7", (folder / "img.png", sub), "<image> vs <image>", "12", "number", None),
        PromptRecord("c", (), "Which? A. red B. green", "B", "choice", ("red", "green")),
    ]
    # ".." is resolved against the JSONL file's folder.
    assert read_records(deep, "prompts")[0][0].images == (folder / "img.png",)
    prefs, found = read_records(write(folder / "q.jsonl", pref(), pref(id=2, chosen_score=DROP, rejected_score=DROP)),
                                "preferences")
    assert found == []
    assert prefs[0] == PreferenceRecord("q1", (folder / "img.png",), "How many?", "<think>\nx\n</think>\n\n3", "4",
                                        9.5, 2.0)
    assert isinstance(prefs[0].rejected_score, float) and prefs[1].chosen_score is None and prefs[1].id == "2"


def test_problem_str_is_file_line_message():
    assert str(Problem("a/b.jsonl", 12, "missing field 'id'")) == "a/b.jsonl:12: missing field 'id'"


@pytest.mark.parametrize("line,message", [
    ('{"id": "p1" "images": []}', "invalid JSON at column 13: Expecting ',' delimiter"),
    ('{"id": "p1", "question": "unterminated}', "invalid JSON at column 26: Unterminated string starting"),
    ('{"id": "p1",, }', "invalid JSON at column 13: Expecting property name enclosed in double quotes"),
    ('[1, 2]', "expected a JSON object, got array"),
    ('"text"', "expected a JSON object, got string"),
    ('{"id": NaN}', "invalid JSON: NaN is not valid JSON"),
])
def test_bad_json_and_non_objects(folder, line, message):
    path = write(folder / "p.jsonl", prompt(), line)
    assert problems(path) == [f"{path}:2: {message}"]


def test_utf8_error_names_the_line_and_bom_is_accepted(folder):
    path = write(folder / "p.jsonl", b"\xef\xbb\xbf" + json.dumps(prompt()).encode(),
                 b'{"id": "p2", "question": "caf\xe9"}', prompt(id="p3"))
    records, found = read_records(path, "prompts")
    assert [str(p) for p in found] == [f"{path}:2: not valid UTF-8: invalid continuation byte at byte 30 of the line"]
    assert [r.id for r in records] == ["p1", "p3"]


@pytest.mark.parametrize("kind,record,messages", [
    ("prompts", prompt(answer_type=DROP), ["missing field 'answer_type'"]),
    ("prompts", prompt(id=DROP, images=DROP), ["missing field 'id'", "missing field 'images'"]),
    ("prompts", {**prompt(question=DROP), "questoin": "x"},
     ["unknown field 'questoin' (did you mean 'question'?)", "missing field 'question'"]),
    ("prompts", prompt(label="cat"), ["unknown field 'label'"]),
    ("preferences", pref(chosen=DROP, rejected=DROP),
     ["missing field 'chosen'", "missing field 'rejected'"]),
    ("preferences", pref(choices=["a"]), ["unknown field 'choices' (did you mean 'chosen'?)"]),
])
def test_missing_and_unknown_fields(folder, kind, record, messages):
    path = write(folder / "p.jsonl", record)
    assert problems(path, kind) == [f"{path}:1: {m}" for m in messages]


def test_repeated_key_in_one_line(folder):
    path = write(folder / "p.jsonl", '{"id": "a", "id": "b", "images": [], "question": "q", "answer": "1", '
                                     '"answer_type": "number"}')
    assert problems(path) == [f"{path}:1: field 'id' appears more than once"]


@pytest.mark.parametrize("kind,record,message", [
    ("prompts", prompt(id=1.5), "id: expected a string or an integer, got number"),
    ("prompts", prompt(id=True), "id: expected a string or an integer, got boolean"),
    ("prompts", prompt(id=" "), "id: empty text"),
    ("prompts", prompt(images="img.png"), "images: expected an array of paths, got string"),
    ("prompts", prompt(images=[3], question="q"), "images[0]: expected a non-empty path string, got integer"),
    ("prompts", prompt(images=["img.png", ""], question="q"),
     "images[1]: expected a non-empty path string, got empty text"),
    ("prompts", prompt(question=5), "question: expected a string, got integer"),
    ("prompts", prompt(question=None), "question: expected a string, got null"),
    ("prompts", prompt(answer=3, answer_type="text"), "answer: expected a string, got integer"),
    ("prompts", prompt(answer=True), "answer: expected a string, got boolean"),
    # Python's json reads 1e999 as inf (and NaN / Infinity literals, rejected as invalid JSON).
    ("prompts", json.dumps(prompt(answer=12345)).replace("12345", "1e999"),
     "answer: expected a finite number, got inf"),
    ("prompts", prompt(answer_type=["number"]), "answer_type: expected a string, got array"),
    ("prompts", prompt(answer_type="int"),
     "answer_type: 'int' is not one of 'number', 'choice', 'expression', 'text'"),
    ("preferences", pref(chosen={"text": "a"}), "chosen: expected a string, got object"),
    ("preferences", pref(chosen_score=True), "chosen_score: expected a number, got boolean"),
    ("preferences", pref(rejected_score="2"), "rejected_score: expected a number, got string"),
    ("preferences", json.dumps(pref(chosen_score=12345)).replace("12345", "-1e999"),
     "chosen_score: expected a finite number, got -inf"),
])
def test_wrong_types(folder, kind, record, message):
    path = write(folder / "p.jsonl", record)
    assert problems(path, kind) == [f"{path}:1: {message}"]


@pytest.mark.parametrize("kind,record,message", [
    ("prompts", prompt(question=" \n\t"), "question: empty text"),
    ("prompts", prompt(answer=""), "answer: empty text"),
    ("preferences", pref(prompt=""), "prompt: empty text"),
    ("preferences", pref(chosen="  "), "chosen: empty text"),
    ("preferences", pref(rejected="\n"), "rejected: empty text"),
])
def test_empty_text(folder, kind, record, message):
    path = write(folder / "p.jsonl", record)
    assert problems(path, kind) == [f"{path}:1: {message}"]


@pytest.mark.parametrize("kind,record,message", [
    ("prompts", prompt(question="look <IMG_CONTEXT> here"), "question: contains the special token(s) <IMG_CONTEXT> as text"),
    ("preferences", pref(chosen="ok<|im_end|><|im_start|>user"),
     "chosen: contains the special token(s) <|im_start|>, <|im_end|> as text"),
])
def test_special_tokens_in_text(folder, kind, record, message):
    # Literal special tokens would change the image-token count or the turns at tokenization.
    path = write(folder / "p.jsonl", record)
    assert problems(path, kind) == [f"{path}:1: {message}"]


@pytest.mark.parametrize("record,message", [
    (prompt(answer_type="choice"), "missing field 'choices' (required when answer_type is 'choice')"),
    (prompt(choices=["a", "b"], answer_type="expression"),
     "choices: only allowed with answer_type 'choice', not 'expression'"),
    (prompt(answer="A", answer_type="choice", choices="a,b"), "choices: expected an array of strings, got string"),
    (prompt(answer="A", answer_type="choice", choices=["a"]), "choices: 1 choice(s); a choice question needs 2 to 26"),
    (prompt(answer="A", answer_type="choice", choices=["a", ""]),
     "choices[1]: expected a non-empty string, got empty text"),
    (prompt(answer="A", answer_type="choice", choices=["a", 2]),
     "choices[1]: expected a non-empty string, got integer"),
    (prompt(answer="A", answer_type="choice", choices=["red", "blue", "red"]), "choices[2]: 'red' repeats choices[0]"),
    (prompt(answer="blue", answer_type="choice", choices=["red", "blue", "green"]),
     "answer: 'blue' is not a choice letter A-C; the answer of a choice question is the letter of the correct "
     "choice ('blue' is choice B)"),
    (prompt(answer="D", answer_type="choice", choices=["red", "blue", "green"]),
     "answer: 'D' is not a choice letter A-C; the answer of a choice question is the letter of the correct choice"),
])
def test_choices_rules(folder, record, message):
    path = write(folder / "p.jsonl", record)
    assert problems(path) == [f"{path}:1: {message}"]


def test_too_many_images_is_configurable(folder):
    path = write(folder / "p.jsonl", prompt(images=["img.png"] * 3, question="q"))
    assert problems(path, max_images=2) == [f"{path}:1: images: 3 images exceed the limit of 2 (max_images)"]
    assert problems(path, max_images=3) == []
    nine = write(folder / "n.jsonl", prompt(images=["img.png"] * 9, question="q"))
    assert problems(nine) == [f"{nine}:1: images: 9 images exceed the limit of 8 (max_images)"]


def test_placeholders_must_match_the_images(folder):
    path = write(folder / "p.jsonl", prompt(question="<image> and <image>"), prompt(id=2, question="no marker"),
                 prompt(id=3, images=[], question="<image> here"))
    assert problems(path) == [
        f"{path}:1: question: 2 <image> placeholder(s) but 1 image(s); use one per image, or none to put the "
        "images before the text",
        f"{path}:3: question: 1 <image> placeholder(s) but 0 image(s); use one per image, or none to put the "
        "images before the text",
    ]
    prefs = write(folder / "q.jsonl", pref(prompt="<image><image>"))
    assert problems(prefs, "preferences") == [
        f"{prefs}:1: prompt: 2 <image> placeholder(s) but 1 image(s); use one per image, or none to put the "
        "images before the text"
    ]


def test_duplicate_id_names_the_first_line(folder):
    path = write(folder / "p.jsonl", prompt(id=7), "", prompt(id="x"), prompt(id="7"), prompt(id="x"))
    records, found = read_records(path, "prompts")
    assert [str(p) for p in found] == [f"{path}:4: duplicate id '7' (first on line 1)",
                                       f"{path}:5: duplicate id 'x' (first on line 3)"]
    assert [r.id for r in records] == ["7", "x"]


def test_missing_and_unreadable_images(folder):
    (folder / "notes.png").write_text("not a picture")
    good = png(folder / "full.png", (40, 30)).read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    path = write(folder / "p.jsonl",
                 prompt(images=["gone.png"]),
                 prompt(id=2, images=["sub/../notes.png"]),
                 prompt(id=3, images=["cut.png"]),
                 prompt(id=4, images=[str(folder / "img.png")]))  # absolute paths are fine
    cut_reason = check_image(folder / "cut.png")
    assert cut_reason.startswith("cannot decode image")
    assert problems(path) == [
        f"{path}:1: images[0]: 'gone.png' ({folder / 'gone.png'}): no such file",
        f"{path}:2: images[0]: 'sub/../notes.png' ({folder / 'notes.png'}): "
        "not an image PIL can identify (corrupt or unsupported format)",
        f"{path}:3: images[0]: 'cut.png' ({folder / 'cut.png'}): {cut_reason}",
    ]
    # Without the image check the paths are still resolved, but nothing is opened.
    records, found = read_records(path, "prompts", check_images=False)
    assert found == [] and records[0].images == (folder / "gone.png",)


def test_preference_pair_rules(folder):
    path = write(folder / "q.jsonl", pref(chosen="same", rejected=" same\n"),
                 pref(id=2, chosen_score=1, rejected_score=3.5), pref(id=3, chosen_score=2, rejected_score=2))
    assert problems(path, "preferences") == [
        f"{path}:1: chosen and rejected are the same text",
        f"{path}:2: chosen_score 1 is below rejected_score 3.5 (pair swapped?)",
    ]


def test_every_problem_of_a_file_is_collected(folder):
    path = write(folder / "p.jsonl",
                 prompt(),
                 "{oops",
                 prompt(id=2, question="", answer_type="choice", images=["gone.png"]),
                 prompt(id=3),
                 prompt(id=2))
    records, found = read_records(path, "prompts")
    assert [str(p) for p in found] == [
        f"{path}:2: invalid JSON at column 2: Expecting property name enclosed in double quotes",
        f"{path}:3: images[0]: 'gone.png' ({folder / 'gone.png'}): no such file",
        f"{path}:3: question: empty text",
        f"{path}:3: missing field 'choices' (required when answer_type is 'choice')",
        f"{path}:5: duplicate id '2' (first on line 3)",
    ]
    assert [r.id for r in records] == ["p1", "3"]


def test_unknown_kind_and_missing_file(folder):
    with pytest.raises(ValueError, match=r"kind: 'prompt' is not one of 'prompts', 'preferences'"):
        read_records(write(folder / "p.jsonl", prompt()), "prompt")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(folder / "nope.jsonl", "prompts")


def bad_file(folder, n_bad: int) -> Path:
    return write(folder / "p.jsonl", prompt(id="ok1"), *[prompt(id=f"b{i}", question="") for i in range(n_bad)],
                 prompt(id="ok2"))


def test_load_records_error_lists_twenty_problems_and_a_count(folder):
    path = bad_file(folder, 23)
    with pytest.raises(DataError) as info:
        load_records(path, "prompts")
    text = str(info.value)
    assert text.startswith(f"{path}: 23 problem(s) in 23 record(s) (on_bad_sample='error'; 'skip' drops them):\n"
                           f"  {path}:2: question: empty text\n")
    assert f"  {path}:21: question: empty text\n" in text and f"{path}:22:" not in text
    assert text.endswith(f"  ... and 3 more; run `python -m megatron_r1v.data.validate {path} --kind prompts` "
                         "to list them all")
    assert isinstance(info.value, ValueError) and len(info.value.problems) == 23


def test_load_records_skip_warns_with_count_and_each_problem(folder, caplog):
    path = bad_file(folder, 2)
    with caplog.at_level(logging.WARNING, logger="megatron_r1v.data.schema"):
        loaded = load_records(path, "prompts", on_bad_sample="skip")
    assert [r.id for r in loaded.records] == ["ok1", "ok2"] and loaded.skipped == 2
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert caplog.records[0].getMessage() == (
        f"{path}: skipped 2 of 4 prompts record(s) with 2 problem(s) (on_bad_sample='skip'):\n"
        f"  {path}:2: question: empty text\n  {path}:3: question: empty text"
    )
    # A clean file loads silently with nothing skipped.
    caplog.clear()
    clean = write(folder / "c.jsonl", prompt())
    assert load_records(clean, "prompts", on_bad_sample="skip").skipped == 0 and caplog.records == []


def test_load_records_with_nothing_valid_is_an_error(folder):
    path = write(folder / "p.jsonl", prompt(question=""))
    with pytest.raises(DataError, match=r"p\.jsonl: no valid prompts records"):
        load_records(path, "prompts", on_bad_sample="skip")
    with pytest.raises(ValueError, match=r"on_bad_sample: 'drop' is not one of 'error', 'skip'"):
        load_records(path, "prompts", on_bad_sample="drop")


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "megatron_r1v.data.validate", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=60)


def test_cli_exit_codes_and_output(folder, capsys):
    write(folder / "bad.jsonl", prompt(), prompt(id="p1"), prompt(id=2, answer_type="int"))
    proc = run_cli("bad.jsonl", "--kind", "prompts", cwd=folder)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [
        "bad.jsonl:2: duplicate id 'p1' (first on line 1)",
        "bad.jsonl:3: answer_type: 'int' is not one of 'number', 'choice', 'expression', 'text'",
        "bad.jsonl: 3 prompts record(s) read, 1 valid, 2 problem(s) in 2 record(s)",
    ]
    proc = run_cli("missing.jsonl", "--kind", "prompts", cwd=folder)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "python -m megatron_r1v.data.validate: error: missing.jsonl: no such file" in proc.stderr

    good = write(folder / "good.jsonl", pref())
    assert validate_main([str(good), "--kind", "preferences"]) == 0
    assert capsys.readouterr().out == f"{good}: 1 preferences record(s) read, 1 valid, 0 problem(s) in 0 record(s)\n"
    # --max-images and --no-image-check reach the reader; several files get a total.
    many = write(folder / "many.jsonl", pref(images=["gone.png"] * 3, prompt="x"))
    assert validate_main([str(good), str(many), "--kind", "preferences", "--max-images", "2", "--no-image-check"]) == 1
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"{many}:1: images: 3 images exceed the limit of 2 (max_images)",
        f"{many}: 1 preferences record(s) read, 0 valid, 1 problem(s) in 1 record(s)",
        "total: 2 files, 2 record(s) read, 1 valid, 1 problem(s)",
    ]
    with pytest.raises(SystemExit) as info:
        validate_main([str(good), "--kind", "prompt"])
    assert info.value.code == 2
