"""python -m megatron_r1v.evaluate: the runner on a tiny random checkpoint, against independent
recomputations; pass@1 / pass@k, lengths and truncation from known responses; resuming; user errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tool_modules import load_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.data.schema import load_records
from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.evaluate import score_text
from megatron_r1v.evaluate.cli import main
from megatron_r1v.rollout.engine import RolloutSample
from megatron_r1v.rollout.hf_engine import HFRolloutEngine

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny-r1v-chat checkpoint in the skywork layout and 6 synthetic prompts."""
    tool = load_tool("make_tiny_checkpoint")
    root = tmp_path_factory.mktemp("evaluate")
    tool.make_tiny_checkpoint(root / "model", seed=0)
    generate_dataset(root / "data", num=6, seed=0)
    return {"model": root / "model", "data": root / "data" / "prompts.jsonl", "root": root}


def _args(setup, out, *extra):
    return ["--benchmark", "project", "--data", str(setup["data"]), "--model", str(setup["model"]),
            "--out", str(out), *extra]


def _result(capsys):
    """The last stdout line (the result) of an in-process run."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _lines(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def recompute(model_dir, data_path, batch_size, params):
    """An independent evaluation: the same prompts made by hand, generation batch by batch
    (batch b with seed b), and the rewards' own functions."""
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tiling import PILTiler, TilingConfig
    from megatron_r1v.rewards.format import check_format, extract_answer
    from megatron_r1v.rewards.rule import rule_reward
    from megatron_r1v.rollout.engine import RolloutRequest, SamplingParams
    from megatron_r1v.rollout.hf_engine import load_hf_engine

    records = load_records(data_path, "prompts").records
    engine, arch, tokenizer = load_hf_engine(model_dir)
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=arch.tokens_per_tile))
    tiler = PILTiler(TilingConfig(image_size=arch.vision.image_size, max_tiles=12))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = []
    for b, start in enumerate(range(0, len(records), batch_size)):
        requests = []
        for r in records[start:start + batch_size]:
            images = tiler.tile_files(r.images).kept()
            ids = template.prompt_ids(r.id, r.question, [img.num_tiles for img in images])
            requests.append(RolloutRequest(r.id, ids, torch.cat([img.pixel_values for img in images])))
        groups = engine.generate(requests, SamplingParams(seed=b, stop_token_ids=(im_end,), **params))
        texts += [[s.text for s in g] for g in groups]
    correct = [[rule_reward(extract_answer(t), r.answer, r.answer_type, r.choices) == 1.0 for t in group]
               for r, group in zip(records, texts)]
    fmt = [[check_format(t, think_opened_by_prompt=True).score == 1.0 for t in group] for group in texts]
    return records, texts, correct, fmt


def test_greedy_pass_at_1_equals_an_independent_recomputation(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, "--samples", "1", "--temperature", "0", "--repetition-penalty", "1",
                      "--max-new-tokens", str(MAX_NEW), "--batch-size", "4")) == 0
    result = _result(capsys)
    records, texts, correct, fmt = recompute(setup["model"], setup["data"], 4,
                                             dict(n=1, temperature=0, max_new_tokens=MAX_NEW))
    assert result["benchmark"] == "project" and result["num_items"] == 6 and result["k"] == 1
    assert result["pass@1"] == result["pass@k"] == sum(c[0] for c in correct) / 6
    assert result["format"] == sum(f[0] for f in fmt) / 6
    rows = _lines(out)
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert [[s["text"] for s in r["responses"]] for r in rows] == texts and all(t[0] for t in texts)
    assert set(result["by_type"]) == {r.answer_type for r in records} == {"choice", "number"}
    assert sum(v["num_items"] for v in result["by_type"].values()) == 6
    assert json.loads((out / "result.json").read_text()) == result
    assert json.loads((out / "run.json").read_text())["samples"] == 1
    # The default data.tiler=auto tiles with DALI here (bit-identical to recompute()'s PILTiler).
    assert result["tiler"] == "dali (r1v.internvl_tiles, 2 threads)"


def test_sampled_runs_match_direct_engine_calls(setup, tmp_path, capsys):
    """k = 3 samples at the released inference's settings: the same texts as the engine gives
    for the same seeds, and pass@1 / pass@k / per-run accuracy from the independent scores."""
    out = tmp_path / "run"
    assert main(_args(setup, out, "--samples", "3", "--max-new-tokens", str(MAX_NEW), "--batch-size", "4")) == 0
    result = _result(capsys)
    params = dict(n=3, temperature=0.6, top_p=0.95, repetition_penalty=1.05, max_new_tokens=MAX_NEW)
    _, texts, correct, _ = recompute(setup["model"], setup["data"], 4, params)
    assert [[s["text"] for s in r["responses"]] for r in _lines(out)] == texts
    assert any(len(set(group)) > 1 for group in texts)  # sampled, not greedy
    assert result["k"] == 3 and result["temperature"] == 0.6 and result["repetition_penalty"] == 1.05
    assert result["pass@1"] == pytest.approx(sum(sum(c) / 3 for c in correct) / 6)
    assert result["pass@k"] == sum(any(c) for c in correct) / 6
    assert result["pass@1_by_run"] == [sum(c[j] for c in correct) / 6 for j in range(3)]


def forced_generate(make_text, calls):
    """A stand-in for HFRolloutEngine.generate: sample j of a request answers make_text(id, j),
    with 10 * (j + 1) tokens, and ends unless j == 2 (cut at the budget)."""

    def generate(self, requests, params):
        calls.append(params)
        return [[RolloutSample(r.prompt_id, torch.ones(10 * (j + 1), dtype=torch.long), torch.zeros(10 * (j + 1)),
                               j != 2, make_text(r.prompt_id, j)) for j in range(params.n)] for r in requests]

    return generate


def well_formed(answer):
    return f"Let me count.\n</think>\n\nThe answer is \\boxed{{{answer}}}.<|im_end|>"


def test_pass_rates_lengths_and_truncation_from_known_responses(setup, tmp_path, monkeypatch, capsys):
    records = load_records(setup["data"], "prompts").records
    index = {r.id: i for i, r in enumerate(records)}
    wrong = {"choice": "Z", "number": "999"}

    def text(prompt_id, j):  # item i: sample j right iff (i + j) % 3 == 0; item 0 never right
        i = index[prompt_id]
        r = records[i]
        return well_formed(r.answer if i and (i + j) % 3 == 0 else wrong[r.answer_type])

    calls = []
    monkeypatch.setattr(HFRolloutEngine, "generate", forced_generate(text, calls))
    assert main(_args(setup, tmp_path / "run", "--samples", "3", "--max-new-tokens", "40", "--batch-size", "4")) == 0
    result = _result(capsys)
    assert [c.n for c in calls] == [3, 3] and [c.seed for c in calls] == [0, 1]
    assert calls[0].max_new_tokens == 40 and calls[0].repetition_penalty == 1.05
    assert result["pass@1"] == pytest.approx(5 / 18) and result["pass@k"] == 5 / 6
    right_by_run = [sum(1 for i in range(1, 6) if (i + j) % 3 == 0) / 6 for j in range(3)]
    assert result["pass@1_by_run"] == right_by_run
    assert result["truncation_rate"] == pytest.approx(1 / 3) and result["format"] == 1.0
    assert result["lengths"]["mean_tokens"] == 20 and result["lengths"]["p90_tokens"] == 30
    correct_tokens = [10 * (j + 1) for i in range(1, 6) for j in range(3) if (i + j) % 3 == 0]
    assert result["lengths"]["correct"]["mean_tokens"] == pytest.approx(sum(correct_tokens) / 5, abs=0.01)
    assert result["lengths"]["correct"]["num_samples"] == 5 and result["lengths"]["incorrect"]["num_samples"] == 13
    for answer_type, entry in result["by_type"].items():
        group = [i for i, r in enumerate(records) if r.answer_type == answer_type]
        assert entry["pass@k"] == sum(1 for i in group if i) / len(group)
    row = _lines(tmp_path / "run")[1]
    assert row["responses"][2]["finished"] is False and row["responses"][0]["method"] == "boxed"
    assert {"text", "extracted", "rule", "judge", "correct", "format", "tokens"} <= set(row["responses"][0])


def test_a_killed_run_resumes_to_the_uninterrupted_result(setup, tmp_path, monkeypatch, capsys):
    records = load_records(setup["data"], "prompts").records

    def text(prompt_id, j):
        return well_formed(records[int(prompt_id.split("-")[-1]) % 6].answer if j == 0 else "0")

    args = ("--samples", "2", "--max-new-tokens", "30", "--batch-size", "2")
    monkeypatch.setattr(HFRolloutEngine, "generate", forced_generate(text, []))
    assert main(_args(setup, tmp_path / "clean", *args)) == 0
    clean = _result(capsys)

    calls = []
    crash = forced_generate(text, calls)

    def crash_on_second_batch(self, requests, params):
        if len(calls) == 1:
            raise RuntimeError("killed")
        return crash(self, requests, params)

    monkeypatch.setattr(HFRolloutEngine, "generate", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        main(_args(setup, tmp_path / "run", *args))
    assert len(_lines(tmp_path / "run")) == 2  # batch 1 was written and flushed
    with open(tmp_path / "run" / "samples.jsonl", "a") as f:
        f.write('{"id": "syn-0000')  # a line cut by the kill
    calls.clear()
    monkeypatch.setattr(HFRolloutEngine, "generate", forced_generate(text, calls))
    assert main(_args(setup, tmp_path / "run", *args)) == 0
    captured = capsys.readouterr()
    resumed = json.loads(captured.out.strip().splitlines()[-1])
    assert len(calls) == 2 and [c.seed for c in calls] == [1, 2]  # batches 2 and 3 only
    assert "cut last line" in captured.err and "resuming: 2 of 6" in captured.err
    for key in ("pass@1", "pass@k", "pass@1_by_run", "by_type", "lengths", "truncation_rate", "format"):
        assert resumed[key] == clean[key], key
    assert main(_args(setup, tmp_path / "run", "--samples", "3", "--max-new-tokens", "30")) == 2
    assert "other sampling settings" in capsys.readouterr().err


def test_the_default_budget_is_cut_to_the_model_positions(setup, tmp_path, monkeypatch, capsys):
    """64000 new tokens by default; tiny-r1v-chat has 2048 positions: each request gets what its
    own prompt leaves (so a long prompt does not shorten the others)."""
    budgets = []

    def generate(self, requests, params):
        budgets.append([(params.max_new_tokens, r.max_new_tokens, len(r.prompt_ids)) for r in requests])
        return [[RolloutSample(r.prompt_id, torch.ones(1, dtype=torch.long), torch.zeros(1), True, "x")]
                for r in requests]

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)
    assert main(_args(setup, tmp_path / "run", "--limit", "3", "--batch-size", "3")) == 0
    assert [call for call, cap, prompt in budgets[0]] == [64000] * 3
    assert [cap for call, cap, prompt in budgets[0]] == [2048 - prompt for call, cap, prompt in budgets[0]]
    assert len({prompt for call, cap, prompt in budgets[0]}) > 1  # prompts of different lengths, own budgets
    assert "--max-new-tokens 64000 does not fit the model's 2048 positions" in capsys.readouterr().err


def test_items_that_cannot_run_stop_the_run_before_generation(setup, tmp_path, monkeypatch, capsys):
    """A prompt longer than the model's positions and an image that does not decode are found
    after the model loads and before anything is generated, every one of them listed."""
    import shutil

    def never(self, requests, params):
        raise AssertionError("generation started")

    monkeypatch.setattr(HFRolloutEngine, "generate", never)
    data = tmp_path / "data"
    shutil.copytree(setup["data"].parent, data)
    rows = [json.loads(line) for line in (data / "prompts.jsonl").read_text().splitlines()]
    rows[1]["question"] = "count the shapes " * 900  # ~2700 tokens: over tiny-r1v-chat's 2048 positions
    (data / rows[4]["images"][0]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (data / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--benchmark", "project", "--data", str(data / "prompts.jsonl"), "--model", str(setup["model"]),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "2 item(s) cannot be run" in err
    assert f"item {rows[1]['id']}: sample {rows[1]['id']}: prompt has" in err and "cannot decode image" in err
    assert not (tmp_path / "run" / "samples.jsonl").exists() or not (tmp_path / "run" / "samples.jsonl").read_text()


def test_a_rerun_over_changed_golds_is_refused(setup, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(HFRolloutEngine, "generate", forced_generate(lambda i, j: well_formed("1"), []))
    data = tmp_path / "data"
    shutil.copytree(setup["data"].parent, data)
    args = ["--benchmark", "project", "--data", str(data / "prompts.jsonl"), "--model", str(setup["model"]),
            "--out", str(tmp_path / "run"), "--max-new-tokens", "8"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (data / "prompts.jsonl").read_text().splitlines()]
    rows[2].pop("choices", None)
    rows[2].update(answer="12345", answer_type="number")
    (data / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"holds item {rows[2]['id']!r} with gold" in err and "the data changed; use another --out" in err


def test_score_text_reads_the_last_box_after_the_thought(setup):
    record = load_records(setup["data"], "prompts").records[0]
    score = score_text(record, well_formed(record.answer))
    assert score.correct and score.format_ok and score.extracted == record.answer
    # The prompt opened <think>: a completion that opens it again is malformed but still right.
    doubled = score_text(record, "<think>\n" + well_formed(record.answer))
    assert doubled.correct and not doubled.format_ok
    cut = score_text(record, "thinking about \\boxed{" + record.answer)
    assert cut.extracted is None and not cut.correct and not cut.format_ok


def test_user_errors_exit_2_before_the_model_loads(setup, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("megatron_r1v.rollout.hf_engine.load_hf_engine", never)
    model, data = str(setup["model"]), str(setup["data"])
    cases = [
        (["--model", model], "give --benchmark NAME with --data PATH, or --suite FILE"),
        (["--model", model, "--benchmark", "project"], "--benchmark needs --data"),
        (["--model", model, "--benchmark", "nope", "--data", data], "nope"),
        (["--model", str(tmp_path / "none"), "--benchmark", "project", "--data", data], "does not exist"),
        (["--model", model, "--benchmark", "project", "--data", data, "--samples", "0"], "--samples"),
        (["--model", model, "--benchmark", "project", "--data", data, "--temperature", "-1"], "temperature"),
        (["--model", model, "--benchmark", "project", "--data", data, "--repetition-penalty", "0"], "repetition"),
        (["--model", model, "--benchmark", "project", "--data", data, "--tp", "2"], "--tp"),
        (["--model", model, "--benchmark", "project", "--data", data, "--seed", "-1"], "--seed must be"),
        (["--model", model, "--benchmark", "project", "--data", data, "--judge-model", "m"], "--judge-url"),
    ]
    for argv, message in cases:
        assert main(argv + ["--out", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "images": [], "question": "2+2?", "answer": "4"}) + "\n")
    assert main(["--model", model, "--benchmark", "project", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "answer_type" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()


def test_cli_process_prints_the_result_line(setup, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_r1v.evaluate", *_args(setup, tmp_path / "r"),
                           "--max-new-tokens", "4", "--limit", "3", "--batch-size", "2", "--samples", "2",
                           "--tiler", "pil", "--tiler-threads", "1"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_items"] == 3 and result["k"] == 2
    assert result["tiler"] == "pil (1 thread; --tiler=pil)" and "batch 2/2 | prompts 3/3" in proc.stderr
    assert not [p for p in tmp_path.rglob(".*")], "a temporary file was left behind"
