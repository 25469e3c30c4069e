"""python -m megatron_r1v.evaluate on files in the benchmarks' public formats (written by
tests/eval_files.py, images embedded): --suite over every format with a tiny checkpoint and an
LLM judge, known responses scored end to end, the issue's single-benchmark commands, and the
export of a prompts file to the public formats (tools/export_benchmark_formats.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from eval_files import (write_aime_jsonl, write_mathverse_json, write_mathvista_json, write_mmmu_parquet,
                        write_olympiadbench_parquet, write_pope_parquet, write_project_jsonl)
from judge_server import FakeJudge, serve_fake_judge  # tests/ is on sys.path (pytest.ini: pythonpath)
from tool_modules import load_tool

from megatron_r1v.evaluate.cli import main
from megatron_r1v.evaluate.scoring import has_final_answer
from megatron_r1v.rollout.engine import RolloutSample
from megatron_r1v.rollout.hf_engine import HFRolloutEngine

WRITERS = {  # suite name -> (benchmark, writer of its files); every public format, embedded images included
    "MathVista": ("mathvista", lambda d: write_mathvista_json(d, 3)),
    "MMMU": ("mmmu", lambda d: write_mmmu_parquet(d, 2, 3)),
    "MathVerse": ("mathverse", lambda d: write_mathverse_json(d, 4)),
    "OlympiadBench": ("olympiadbench", lambda d: write_olympiadbench_parquet(d, 3)),
    "AIME": ("aime", lambda d: write_aime_jsonl(d, 3)),
    "POPE": ("pope", lambda d: write_pope_parquet(d, 6)),
    "project": ("project", lambda d: write_project_jsonl(d, 3)),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny-r1v-chat checkpoint, a file of every format and a suite listing them (2 samples each,
    POPE 1)."""
    root = tmp_path_factory.mktemp("suite")
    load_tool("make_tiny_checkpoint").make_tiny_checkpoint(root / "model", seed=0)
    written, entries = {}, []
    for name, (benchmark, write) in WRITERS.items():
        written[name] = write(root / "data" / name)
        entry = {"name": name, "benchmark": benchmark, "data": os.path.relpath(written[name].path, root)}
        entries.append({**entry, "samples": 1} if benchmark == "pope" else entry)
    suite = root / "suite.yaml"
    suite.write_text(yaml.safe_dump({"samples": 2, "max_new_tokens": 6, "batch_size": 4, "benchmarks": entries}))
    return {"root": root, "model": root / "model", "suite": suite, "written": written}


def _lines(folder):
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_suite_runs_every_format_with_a_judge(files, tmp_path, capsys):
    out = tmp_path / "out"
    with serve_fake_judge(FakeJudge()) as judge:
        assert main(["--suite", str(files["suite"]), "--model", str(files["model"]), "--out", str(out),
                     "--judge-url", judge.url, "--tiler", "pil"]) == 0
        asked = len(judge.chat_bodies)
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    table = json.loads((out / "suite.json").read_text())
    judged = 0
    assert printed[-1] == table and [r["name"] for r in table["benchmarks"]] == list(WRITERS)
    for row, result in zip(table["benchmarks"], printed[:-1]):
        written = files["written"][row["name"]]
        assert row["num_items"] == result["num_items"] == len(written.answers), row["name"]
        assert row["k"] == (1 if row["benchmark"] == "pope" else 2)
        assert json.loads((out / row["name"] / "result.json").read_text()) == result
        lines = _lines(out / row["name"])
        assert [line["id"] for line in lines] == list(written.answers)
        assert [tuple(line["answers"]) for line in lines] == list(written.answers.values())
        # Every response with a final answer (a closed thought) went to the judge and came back with
        # a verdict; the others have none, as they have no rule answer. correct = rule or judge.
        responses = [r for line in lines for r in line["responses"]]
        for response in responses:
            closed = has_final_answer(response["text"])
            assert (response["judge"] in (True, False)) == closed and response["judge_error"] is None
            assert (response["judge_reply"] is not None) == closed
            assert response["correct"] == (response["rule"] or bool(response["judge"]))
        judged += sum(has_final_answer(r["text"]) for r in responses)
        if "judge" in result:
            assert result["judge"]["num_judged"] == sum(has_final_answer(r["text"]) for r in responses)
    assert asked == judged
    assert "hallucination_rate" in table["benchmarks"][list(WRITERS).index("POPE")]
    markdown = (out / "suite.md").read_text()
    assert "| Benchmark | Items | k | pass@1 (%)" in markdown and markdown.count("\n| ") == 1 + len(WRITERS)


def _forced(golds):
    """generate(): sample 0 of an item answers its (first) gold in a box, sample 1 a wrong value."""

    def generate(self, requests, params):
        out = []
        for request in requests:
            texts = [golds[request.prompt_id], "-12345"]
            out.append([RolloutSample(request.prompt_id, torch.ones(3, dtype=torch.long), torch.zeros(3), True,
                                      f"Look.\n</think>\n\nThe answer is \\boxed{{{texts[j % 2]}}}.<|im_end|>")
                        for j in range(params.n)])
        return out

    return generate


def test_gold_answers_of_every_format_score_right(files, tmp_path, monkeypatch, capsys):
    """The readers' golds, answered in a box, score 1 through the whole command (scoring of
    choice letters, lists, expressions, yes/no...); a wrong value scores 0."""
    for name, (benchmark, _) in WRITERS.items():
        written = files["written"][name]
        monkeypatch.setattr(HFRolloutEngine, "generate",
                            _forced({item_id: answers[0] for item_id, answers in written.answers.items()}))
        assert main(["--benchmark", benchmark, "--data", str(written.path), "--model", str(files["model"]),
                     "--samples", "2", "--out", str(tmp_path / name)]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (result["pass@1"], result["pass@k"], result["pass@1_by_run"]) == (0.5, 1.0, [1.0, 0.0]), name


def test_the_judge_grades_what_the_rule_cannot_read(files, tmp_path, monkeypatch, capsys):
    """Sample 0 states the gold without a box or an answer phrase (the rule finds no answer, the
    judge reads it as right); sample 1 never closes its thought (nobody grades it)."""
    written = files["written"]["AIME"]

    def generate(self, requests, params):
        return [[RolloutSample(r.prompt_id, torch.ones(3, dtype=torch.long), torch.zeros(3), True, text)
                 for text in (f"Work.\n</think>\n\nI am sure it is {written.answers[r.prompt_id][0]}.<|im_end|>",
                              f"still thinking about {written.answers[r.prompt_id][0]}")]
                for r in requests]

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)
    with serve_fake_judge(FakeJudge()) as judge:
        assert main(["--benchmark", "aime", "--data", str(written.path), "--model", str(files["model"]),
                     "--samples", "2", "--out", str(tmp_path / "run"), "--judge-url", judge.url]) == 0
        assert len(judge.chat_bodies) == len(written.answers)  # the unclosed samples were not sent
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["pass@1"], result["pass@k"]) == (0.5, 1.0)
    assert result["judge"] == {"num_judged": 3, "no_verdict": 0, "rule_correct": 0.0, "judge_correct": 1.0,
                               "agreement_with_rule": 0.0}
    for line in _lines(tmp_path / "run"):
        first, second = line["responses"]
        assert (first["rule"], first["judge"], first["correct"], first["method"]) == (False, True, True, "none")
        assert "[[CORRECT]]" in first["judge_reply"]
        assert (second["judge"], second["judge_reply"], second["correct"]) == (None, None, False)


def test_mathvista_command_prints_the_result_line(files, tmp_path):
    """The issue's check: a testmini-format file, the tiny checkpoint, --samples 2, default budget."""
    data = files["written"]["MathVista"].path
    proc = subprocess.run([sys.executable, "-m", "megatron_r1v.evaluate", "--benchmark", "mathvista", "--data",
                           str(data), "--model", str(files["model"]), "--samples", "2"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["benchmark"], result["num_items"], result["k"]) == ("mathvista", 3, 2)
    assert set(result) >= {"pass@1", "pass@k", "by_type", "lengths", "truncation_rate"}
    assert set(result["by_type"]) == {"multi_choice", "free_form"}
    assert "does not fit the model's 2048 positions" in proc.stderr
    folders = list((tmp_path / "evaluations").iterdir())  # the default run folder, named by the settings
    assert len(folders) == 1 and folders[0].name.startswith("mathvista-")


def test_mmmu_parquet_command(files, tmp_path, capsys):
    data = files["written"]["MMMU"].path.parent.parent  # the folder of subject folders, as downloaded
    assert main(["--benchmark", "mmmu", "--data", str(data), "--model", str(files["model"]), "--samples", "2",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "mmmu")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["benchmark"], result["num_items"], result["k"]) == ("mmmu", 5, 2)
    assert result["by_type"]["Art_Theory"]["num_items"] == 5


def test_suite_file_errors_name_the_entry(files, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    for content, message in [
        ({"benchmarks": [{"benchmark": "mathvista"}]}, "benchmarks[0]: 'data' must be a non-empty string"),
        ({"benchmarks": [{"benchmark": "x", "data": "f"}]}, "benchmarks[0]: benchmark 'x' is not one of"),
        ({"benchmarks": [{"benchmark": "aime", "data": "f", "color": 1}]}, "unknown key(s) ['color']"),
        ({"sample": 2, "benchmarks": []}, "unknown key(s) ['sample']"),
        ({"benchmarks": [{"benchmark": "aime", "data": "a.jsonl", "samples": 0}]}, "--samples must be"),
        ({"benchmarks": [{"benchmark": "aime", "data": "missing.jsonl"}]}, "missing.jsonl"),
    ]:
        bad.write_text(yaml.safe_dump(content))
        assert main(["--suite", str(bad), "--model", str(files["model"]), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (content, err)
    assert main(["--suite", str(files["suite"]), "--model", str(files["model"]), "--out", str(tmp_path / "o"),
                 "--judge-url", "http://127.0.0.1:9/v1"]) == 2
    assert "http://127.0.0.1:9/v1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_to_public_formats_reads_back(tmp_path):
    """A perception split exported as MathVista testmini JSON and MMMU parquet: the readers give
    back its questions' golds, kinds and image bytes, and the suite file lists all three."""
    from megatron_r1v.data.schema import load_records
    from megatron_r1v.data.synthetic import generate_dataset
    from megatron_r1v.evaluate.formats import read_benchmark
    from megatron_r1v.evaluate.scoring import score_response
    from megatron_r1v.evaluate.suite import load_suite

    generate_dataset(tmp_path / "data", num=9, seed=1, family="perception")
    load_tool("export_benchmark_formats").main(["--prompts", str(tmp_path / "data" / "prompts.jsonl"),
                                                "--out", str(tmp_path / "formats")])
    records = load_records(tmp_path / "data" / "prompts.jsonl", "prompts").records
    suite = load_suite(tmp_path / "formats" / "suite.yaml")
    assert [e.benchmark for e in suite] == ["project", "mathvista", "mmmu"]
    for entry in suite[1:]:
        items = read_benchmark(entry.benchmark, entry.data)
        assert [i.images[0].read_bytes() if isinstance(i.images[0], Path) else i.images[0].data for i in items] \
            == [r.images[0].read_bytes() for r in records]
        for item, record in zip(items, records):
            assert item.answer_kind == record.answer_type, (entry.benchmark, item)
            answer = f"Look.\n</think>\n\nThe answer is \\boxed{{{record.answer}}}.<|im_end|>"
            assert score_response(item, answer).correct, (entry.benchmark, item, record)
            assert not score_response(item, answer.replace(record.answer, "7" + record.answer)).correct
