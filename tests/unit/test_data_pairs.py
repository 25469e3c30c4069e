"""MPO pair selection by reward margin (data/pairs.py) and the scored JSONL schema it reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from megatron_r1v.data.pairs import build_pairs, filter_pairs, load_pairs, main, write_pairs
from megatron_r1v.data.schema import (
    PreferenceRecord,
    ScoredRecord,
    ScoredResponse,
    load_records,
    read_records,
)
from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.validate import main as validate_main

REPO = Path(__file__).resolve().parents[2]
DROP = object()  # marks a field to leave out of a record


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (10, 200, 10)).save(path)
    return path


def write(path: Path, *lines) -> Path:
    """Lines are dicts (dumped as JSON) or str (written as is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


def scored(**fields) -> dict:
    record = {"id": "s1", "images": ["img.png"], "prompt": "How many?",
              "responses": [{"text": "3", "score": 9}, {"text": "4", "score": 1.5}]}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not DROP}


def responses(*pairs) -> list[dict]:
    return [{"text": text, "score": score} for text, score in pairs]


# p1: b..e are 8, 15, 11, 15 below the chosen "a"; " a\n" repeats the chosen text.
# p2: "x" and "y" tie at the top (x comes first); "z" is 16 below.
# p3: one response, nothing to pair.  p4: a single pair 7.5 apart, with an image placeholder.
SCORED_LINES = [
    {"id": "p1", "images": ["img.png"], "prompt": "Count the dots.",
     "responses": responses(("a", 20), ("b", 12), ("c", 5), ("d", 9), ("e", 5), (" a\n", 1))},
    {"id": "p2", "images": [], "prompt": "Text only.", "responses": responses(("x", 30), ("y", 30), ("z", 14))},
    {"id": "p3", "images": ["img.png"], "prompt": "Alone.", "responses": responses(("only", 3))},
    {"id": 4, "images": ["img.png", "sub/b.png"], "prompt": "<image> or <image>?",
     "responses": responses(("bad", 2.5), ("good", 10))},
]


@pytest.fixture
def data(tmp_path) -> Path:
    """A scored JSONL in tmp_path/data with its images beside it."""
    png(tmp_path / "data" / "img.png")
    png(tmp_path / "data" / "sub" / "b.png")
    return write(tmp_path / "data" / "scored.jsonl", *SCORED_LINES)


def summary(pairs: list[PreferenceRecord]) -> list[tuple]:
    return [(p.id, p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in pairs]


@pytest.mark.parametrize("margin, cap, expected", [
    (7, 1, [("p1#0", "a", "c", 20, 5), ("p2#0", "x", "z", 30, 14), ("4#0", "good", "bad", 10, 2.5)]),
    (10, 1, [("p1#0", "a", "c", 20, 5), ("p2#0", "x", "z", 30, 14)]),
    # 20 - 5 = 15 is not above 15: the test is strict.
    (15, 1, [("p2#0", "x", "z", 30, 14)]),
    # Lowest score first; "c" and "e" tie at 5 and keep their file order.
    (7, 2, [("p1#0", "a", "c", 20, 5), ("p1#1", "a", "e", 20, 5), ("p2#0", "x", "z", 30, 14),
            ("4#0", "good", "bad", 10, 2.5)]),
    (7, 0, [("p1#0", "a", "c", 20, 5), ("p1#1", "a", "e", 20, 5), ("p1#2", "a", "d", 20, 9),
            ("p1#3", "a", "b", 20, 12), ("p2#0", "x", "z", 30, 14), ("4#0", "good", "bad", 10, 2.5)]),
    (10, 0, [("p1#0", "a", "c", 20, 5), ("p1#1", "a", "e", 20, 5), ("p1#2", "a", "d", 20, 9),
             ("p2#0", "x", "z", 30, 14)]),
    (15, 0, [("p2#0", "x", "z", 30, 14)]),
    # A negative margin also pairs equal scores: "y" ties "x" at 30 and 30 - 30 = 0 > -1.
    (-1, 0, [("p1#0", "a", "c", 20, 5), ("p1#1", "a", "e", 20, 5), ("p1#2", "a", "d", 20, 9),
             ("p1#3", "a", "b", 20, 12), ("p2#0", "x", "z", 30, 14), ("p2#1", "x", "y", 30, 30),
             ("4#0", "good", "bad", 10, 2.5)]),
])
def test_build_pairs_exact(data, margin, cap, expected):
    records = load_records(data, "scored").records
    pairs = build_pairs(records, margin, max_pairs_per_prompt=cap)
    assert summary(pairs) == expected
    # The same-text response " a\n" is never a rejected, whatever the margin.
    assert all(p.rejected.strip() != p.chosen.strip() for p in pairs)
    by_id = {r.id: r for r in records}
    for pair in pairs:
        source = by_id[pair.id.split("#")[0]]
        assert (pair.images, pair.prompt) == (source.images, source.prompt)


def test_build_pairs_ties_and_same_text_directly(tmp_path):
    image = (png(tmp_path / "i.png"),)
    records = [
        # Tie at the top: the first in file order is chosen, even though the second is longer.
        ScoredRecord("t", image, "q", (ScoredResponse("first", 9.0), ScoredResponse("second best", 9.0),
                                       ScoredResponse("low", 0.0))),
        # Every other response repeats the chosen text: no pair at all.
        ScoredRecord("same", image, "q", (ScoredResponse(" yes ", 10.0), ScoredResponse("yes", 0.0))),
    ]
    assert summary(build_pairs(records, 5.0, 0)) == [("t#0", "first", "low", 9.0, 0.0)]


@pytest.mark.parametrize("margin, cap, message", [
    (float("nan"), 1, "margin: expected a finite number, got nan"),
    (True, 1, "margin: expected a finite number, got True"),
    (7, -1, r"max_pairs_per_prompt: expected an integer >= 0 \(0 = all\), got -1"),
])
def test_build_pairs_rejects_bad_arguments(margin, cap, message):
    with pytest.raises(ValueError, match=message):
        build_pairs([], margin, cap)


def test_build_pairs_ids_stay_unique():
    three = (ScoredResponse("x", 9.0), ScoredResponse("y", 0.0), ScoredResponse("z", 1.0))
    records = [ScoredRecord("a#0", (), "q", three), ScoredRecord("a", (), "q", three)]
    assert [p.id for p in build_pairs(records, 1.0, 0)] == ["a#0#0", "a#0#1", "a#0", "a#1"]
    # Hand-built records may repeat a prompt id (files cannot: the schema refuses it).
    with pytest.raises(ValueError, match=r"prompt id 'a' appears more than once; its pair ids would repeat"):
        build_pairs(records + records[1:], 1.0, 0)


@pytest.mark.parametrize("margin, cap, counts", [
    # (kept, total_candidates, dropped_margin, dropped_cap): p1 has 4 candidates, p2 2, p3 0, p4 1.
    (7, 1, (3, 7, 1, 3)),
    (10, 1, (2, 7, 3, 2)),
    (15, 1, (1, 7, 6, 0)),
    (10, 0, (4, 7, 3, 0)),
])
def test_load_pairs_counts(data, margin, cap, counts):
    pair_set = load_pairs(data, "scored", margin, cap)
    assert (pair_set.kept, pair_set.total_candidates, pair_set.dropped_margin, pair_set.dropped_cap) == counts
    assert pair_set.kept == len(pair_set.records) and pair_set.prompts == 4 and pair_set.skipped_bad == 0
    assert sum(counts[:1] + counts[2:]) == pair_set.total_candidates


def test_load_pairs_errors(data, tmp_path):
    with pytest.raises(ValueError, match=rf"^{data}: no pair has a reward margin above 30 out of 7 candidate "
                                         rf"pair\(s\) \(scores 1 to 30, largest chosen-rejected margin 16\); "
                                         rf"lower the margin$"):
        load_pairs(data, "scored", 30)
    with pytest.raises(ValueError, match=rf"^{data}: scored data needs a margin"):
        load_pairs(data, "scored", None)
    with pytest.raises(ValueError, match=r"data_format: 'pairs' is not one of 'preferences', 'scored'"):
        load_pairs(data, "pairs", 7)


def test_load_pairs_skips_bad_records(data, tmp_path):
    path = write(tmp_path / "data" / "mixed.jsonl", *SCORED_LINES, scored(id="bad", responses=[]))
    pair_set = load_pairs(path, "scored", 10, on_bad_sample="skip")
    assert pair_set.skipped_bad == 1 and pair_set.kept == 2
    assert pair_set.summary() == ("kept 2 of 7 pairs (margin > 10): 3 below the margin, 2 over the per-prompt cap, "
                                  "1 bad records skipped")
    with pytest.raises(ValueError, match=r"responses: empty array"):
        load_pairs(path, "scored", 10)


def pref(pair_id, chosen_score, rejected_score) -> PreferenceRecord:
    return PreferenceRecord(pair_id, (), "q", "good", "bad", chosen_score, rejected_score)


def test_filter_pairs_with_and_without_scores():
    pairs = [pref("a", 17.0, 2.0), pref("b", 12.0, 2.0), pref("c", 9.5, 2.0), pref("d", 3.0, 3.0)]
    assert [p.id for p in filter_pairs(pairs, 7)] == ["a", "b", "c"]
    assert [p.id for p in filter_pairs(pairs, 10)] == ["a"]  # b: 10 is not above 10
    assert [p.id for p in filter_pairs(pairs, 15)] == []
    assert [p.id for p in filter_pairs(pairs, -0.5)] == ["a", "b", "c", "d"]
    unscored = pairs + [pref("e", None, 1.0), pref("f", 5.0, None)]
    assert filter_pairs(unscored, None) == unscored
    with pytest.raises(ValueError, match=r"^margin 7 needs chosen_score and rejected_score on every pair; "
                                         r"2 pair\(s\) lack them: 'e', 'f'$"):
        filter_pairs(unscored, 7)
    many = [pref(str(i), None, None) for i in range(7)]
    with pytest.raises(ValueError, match=r"7 pair\(s\) lack them: '0', '1', '2', '3', '4' and 2 more$"):
        filter_pairs(many, 0)


def test_synthetic_preferences_filtered_by_margin(tmp_path):
    out = tmp_path / "syn"
    generate_dataset(out, num=30, seed=0)
    path = out / "preferences.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = load_records(path, "preferences").records
    kept_counts = []
    for margin in (7, 10, 15):
        expected = [r["id"] for r in raw if r["chosen_score"] - r["rejected_score"] > margin]
        assert [r.id for r in filter_pairs(records, margin)] == expected
        assert load_pairs(path, "preferences", margin).kept == len(expected)
        kept_counts.append(len(expected))
    # The synthetic scores spread wide enough that the three thresholds select different sets.
    assert kept_counts[0] > kept_counts[1] > kept_counts[2] > 0


def test_cli_round_trip(data, tmp_path, capsys):
    out = tmp_path / "out" / "nested" / "pairs.jsonl"
    assert main([str(data), "--format", "scored", "--margin", "7", "--out", str(out)]) == 0
    assert capsys.readouterr().out == (f"kept 3 of 7 pairs (margin > 7): 1 below the margin, 3 over the per-prompt "
                                       f"cap, 0 bad records skipped; wrote {out}\n")
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # Image paths are rewritten relative to the output's folder...
    assert lines[2] == {"id": "4#0", "images": ["../../data/img.png", "../../data/sub/b.png"],
                        "prompt": "<image> or <image>?", "chosen": "good", "rejected": "bad",
                        "chosen_score": 10.0, "rejected_score": 2.5}
    # ...so they resolve to the same files, and the output is valid preferences data.
    assert validate_main([str(out), "--kind", "preferences"]) == 0
    written = read_records(out, "preferences")[0]
    source = {r.id: r for r in load_records(data, "scored").records}
    assert [r.images for r in written] == [source[r.id.split("#")[0]].images for r in written]
    assert all(image.is_file() for r in written for image in r.images)
    # Preferences in, preferences out: filtering the written pairs again keeps them.
    again = tmp_path / "out" / "again.jsonl"
    assert main([str(out), "--format", "preferences", "--margin", "15", "--out", str(again)]) == 0
    assert [json.loads(line)["id"] for line in again.read_text().splitlines()] == ["p2#0"]


def test_cli_refuses_overwrite_and_force_replaces(data, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    out.write_text("old\n")
    assert main([str(data), "--format", "scored", "--margin", "10", "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: {out} exists; pass --force to replace it\n"
    assert out.read_text() == "old\n"
    assert main([str(data), "--format", "scored", "--margin", "10", "--out", str(out), "--force"]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["p1#0", "p2#0"]


def test_cli_errors_write_nothing(data, tmp_path, capsys):
    out = tmp_path / "out" / "pairs.jsonl"
    assert main([str(data), "--format", "scored", "--margin", "50", "--out", str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {data}: no pair has a reward margin above 50 ")
    assert main([str(data), "--format", "scored", "--out", str(out)]) == 1
    assert "scored data needs a margin" in capsys.readouterr().err
    bad = write(tmp_path / "data" / "bad.jsonl", scored(responses=[{"text": "x"}]))
    assert main([str(bad), "--format", "scored", "--margin", "1", "--out", str(out)]) == 1
    assert f"{bad}:1: responses[0]: missing field 'score'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_write_failure_keeps_the_old_output(data, tmp_path, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    out.write_text("old\n")
    pairs = load_pairs(data, "scored", 7).records

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_pairs(pairs, out, force=True)
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "pairs.jsonl"]  # no temporary file left


def test_module_entry_point(data, tmp_path):
    out = tmp_path / "p.jsonl"
    done = subprocess.run([sys.executable, "-m", "megatron_r1v.data.pairs", str(data), "--format", "scored",
                           "--margin", "15", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("kept 1 of 7 pairs (margin > 15): 6 below the margin, 0 bad records skipped")


# --- the scored schema ---------------------------------------------------------------------------------


def test_scored_records_parse(tmp_path):
    png(tmp_path / "img.png")
    path = write(tmp_path / "s.jsonl", scored(), scored(id=2, images=[], responses=[{"score": -1, "text": "x"}]))
    records, found = read_records(path, "scored")
    assert found == []
    assert records == [
        ScoredRecord("s1", (tmp_path / "img.png",), "How many?", (ScoredResponse("3", 9.0), ScoredResponse("4", 1.5))),
        ScoredRecord("2", (), "How many?", (ScoredResponse("x", -1.0),)),
    ]
    assert isinstance(records[0].responses[0].score, float)
    assert validate_main([str(path), "--kind", "scored"]) == 0


@pytest.mark.parametrize("record, messages", [
    (scored(responses=DROP), ["missing field 'responses'"]),
    (scored(answer="3"), ["unknown field 'answer'"]),
    (scored(responses={"text": "a", "score": 1}),
     ['responses: expected a non-empty array of {"text", "score"} objects, got object']),
    (scored(responses=[]), ["responses: empty array; a scored record needs at least one response"]),
    (scored(responses=[{"text": "a", "score": 1}, "b"]),
     ["responses[1]: expected an object with 'text' and 'score', got string"]),
    (scored(responses=responses(("a", 1), ("b", 2)) + [{"text": "c"}]), ["responses[2]: missing field 'score'"]),
    (scored(responses=[{"score": 1}]), ["responses[0]: missing field 'text'"]),
    (scored(responses=[{"text": "a", "score": 1, "scor": 2}]),
     ["responses[0]: unknown field 'scor' (did you mean 'score'?)"]),
    (scored(responses=[{"text": "  ", "score": 1}]), ["responses[0].text: empty text"]),
    (scored(responses=[{"text": 3, "score": 1}]), ["responses[0].text: expected a string, got integer"]),
    (scored(responses=[{"text": "a<|im_end|>", "score": 1}]),
     ["responses[0].text: contains the special token(s) <|im_end|> as text"]),
    (scored(responses=[{"text": "a", "score": 1}, {"text": "b", "score": True}]),
     ["responses[1].score: expected a number, got boolean"]),
    (scored(responses=[{"text": "a", "score": None}]), ["responses[0].score: expected a number, got null"]),
    (scored(responses=[{"text": "a", "score": "9"}]), ["responses[0].score: expected a number, got string"]),
    (json.dumps(scored(responses=[{"text": "a", "score": 12345}])).replace("12345", "-1e999"),
     ["responses[0].score: expected a finite number, got -inf"]),
    ('{"id": "s1", "images": [], "prompt": "q", "responses": [{"text": "a", "text": "b", "score": 1}]}',
     ["responses[0]: field 'text' appears more than once"]),
    (scored(prompt="<image><image>"),
     ["prompt: 2 <image> placeholder(s) but 1 image(s); use one per image, or none to put the images before the text"]),
    (scored(prompt=" ", responses=[{"text": "", "score": 1}, {"text": "b"}]),
     ["prompt: empty text", "responses[0].text: empty text", "responses[1]: missing field 'score'"]),
])
def test_scored_schema_errors(tmp_path, record, messages):
    png(tmp_path / "img.png")
    path = write(tmp_path / "s.jsonl", record)
    records, found = read_records(path, "scored")
    assert records == []
    assert sorted(str(p) for p in found) == sorted(f"{path}:1: {m}" for m in messages)
