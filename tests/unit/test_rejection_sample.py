"""tools/rejection_sample.py: selection, SFT output, summary, resume and errors."""

import json
import statistics

import pytest
import torch
from tool_modules import load_tool, run_sampling_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.data import validate
from megatron_r1v.data.schema import load_records
from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.rollout.engine import RolloutSample
from megatron_r1v.rollout.hf_engine import HFRolloutEngine

rs = load_tool("rejection_sample")
Response = rs.Response


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random checkpoint in the skywork layout and 6 synthetic prompts (2 choice, 4 number)."""
    root = tmp_path_factory.mktemp("rejection_sample")
    load_tool("make_tiny_checkpoint").make_tiny_checkpoint(root / "model", seed=0)
    generate_dataset(root / "data", num=6, seed=0)
    records = load_records(root / "data" / "prompts.jsonl", "prompts").records
    return {"model": root / "model", "data": root / "data" / "prompts.jsonl", "records": records}


def ok(tokens, text=None):
    return Response(text or f"r{tokens}", tokens, True, True, True)


def test_accepted_means_finished_formatted_right_and_trainable():
    assert ok(5).accepted and ok(5).reason is None
    assert Response("x", 5, False, True, True).reason == "cut at max_new_tokens"
    assert Response("x", 5, True, True, False).reason == "bad format"
    assert Response("x", 5, True, False, True).reason == "wrong answer"
    assert Response("a<|im_start|>b", 5, True, True, True).reason == "special token in text"


def test_select_keeps_each_accepted_text_once_and_the_shortest_k():
    responses = [ok(9, "a"), Response("b", 2, True, False, True), ok(4, "c"), ok(9, "a"), ok(4, "d"), ok(7, "e")]
    assert rs.select(responses, None) == [0, 2, 4, 5]  # the repeated "a" (sample 3) is dropped
    assert rs.select(responses, 2) == [2, 4]  # lengths 4 and 4: the wrong 2-token answer never counts
    assert rs.select(responses, 3) == [2, 4, 5]
    assert rs.select(responses, 6) == [0, 2, 4, 5]
    assert rs.select([Response("b", 2, True, False, True)], 1) == []


def well_formed(answer, pad):
    return f"Let me count{' again' * pad}.\n</think>\n\nThe answer is \\boxed{{{answer}}}.<|im_end|>"


def fake_generate(records, calls):
    """HFRolloutEngine.generate answering sample k of each prompt: k % 4 == 0 right (longer with k),
    1 wrong, 2 right but cut, 3 the same text as sample 0; the seed shows in the text, so a
    sample drawn in another batch would differ."""
    answers = {r.id: (r.answer, "Z" if r.answer_type == "choice" else "999") for r in records}

    def generate(self, requests, params):
        calls.append([r.prompt_id for r in requests])
        groups = []
        for req in requests:
            right, wrong = answers[req.prompt_id]
            texts = []
            for k in range(params.n):
                pad = params.seed + (k // 4) * 3
                texts.append([well_formed(right, pad), well_formed(wrong, pad), "Let me count \\boxed{" + right,
                              well_formed(right, params.seed)][k % 4])
            groups.append([RolloutSample(req.prompt_id, torch.arange(len(t)), torch.zeros(len(t)),
                                         t.endswith("<|im_end|>"), t) for t in texts])
        return groups

    return generate


def run(setup, out, *extra, prompts=None, progress=None):
    return run_sampling_tool(rs, setup, out, *extra, prompts=prompts, progress=progress)


def outputs(out):
    return {name: (out / name).read_bytes() for name in ("sft.jsonl", "summary.json", "samples.jsonl", "run.json")}


def test_sft_file_and_summary_from_hand_made_responses(setup, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(HFRolloutEngine, "generate", fake_generate(setup["records"], calls))
    out = tmp_path / "out"
    assert run(setup, out, "--samples", "5") == 0
    stdout = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(calls) == 3 and (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"

    # Through the real schema loader and the validator CLI.
    sft = load_records(out / "sft.jsonl", "sft").records
    assert validate.main([str(out / "sft.jsonl"), "--kind", "sft"]) == 0
    # Samples 0 and 4 are right and distinct; 3 repeats 0 (kept once); 1 is wrong, 2 cut.
    assert [r.id for r in sft] == [f"{p.id}#k{k}" for p in setup["records"] for k in (0, 4)]
    by_id = {p.id: p for p in setup["records"]}
    for record in sft:
        prompt = by_id[record.id.split("#")[0]]
        assert record.images == prompt.images
        user, reply = record.messages
        assert user.role == "user" and user.content == prompt.question and reply.role == "assistant"
        assert reply.content.startswith("<think>\nLet me count") and reply.content.count("<think>") == 1
        assert "<|im_end|>" not in reply.content and reply.content.endswith(f"\\boxed{{{prompt.answer}}}.")

    summary = json.loads((out / "summary.json").read_text())
    n_choice = sum(p.answer_type == "choice" for p in setup["records"])
    assert summary["prompts"] == 6 and summary["samples"] == 30 and summary["accepted"] == 18
    assert summary["acceptance_rate"] == 18 / 30 and summary["kept"] == 12
    assert summary["by_answer_type"]["choice"] == {"prompts": n_choice, "samples": 5 * n_choice,
                                                   "accepted": 3 * n_choice, "acceptance_rate": 0.6}
    assert summary["rejected"] == {"cut at max_new_tokens": 6, "bad format": 0, "wrong answer": 6,
                                   "special token in text": 0}
    assert summary["prompts_without_accepted"] == 0 and summary["prompt_ids_without_accepted"] == []
    # Batch b has seed b: prompt i's samples 0 and 3 pad seed times, sample 4 seed + 3 times.
    accepted = []
    for i, prompt in enumerate(setup["records"]):
        seed = i // 2
        accepted += [len(well_formed(prompt.answer, pad)) for pad in (seed, seed, seed + 3)]
    assert summary["accepted_tokens"] == {"mean": statistics.fmean(accepted), "median": statistics.median(accepted)}
    assert stdout["accepted"] == 18 and "settings" not in stdout

    # --keep-shortest only selects: a rerun re-selects without generating.
    assert run(setup, out, "--samples", "5", "--keep-shortest", "1") == 0
    assert len(calls) == 3
    assert [r.id for r in load_records(out / "sft.jsonl", "sft").records] == [f"{p.id}#k0" for p in setup["records"]]
    assert json.loads((out / "summary.json").read_text())["kept"] == 6
    assert not [p for p in tmp_path.rglob(".*")], "a temporary file was left behind"


def test_resume_after_a_prefix_or_a_cut_line_gives_the_same_files(setup, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HFRolloutEngine, "generate", fake_generate(setup["records"], calls))
    data = setup["data"]
    prompts = data.parent / "resume.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    prompts.write_text("".join(lines))
    assert run(setup, tmp_path / "clean", "--samples", "4", prompts=prompts) == 0
    clean = outputs(tmp_path / "clean")
    calls.clear()

    # Killed after two batches: the same file held only their prompts then.
    prompts.write_text("".join(lines[:4]))
    assert run(setup, tmp_path / "resumed", "--samples", "4", prompts=prompts) == 0
    prompts.write_text("".join(lines))
    messages = []
    assert run(setup, tmp_path / "resumed", "--samples", "4", prompts=prompts, progress=messages.append) == 0
    assert calls == [[r.id for r in setup["records"][b:b + 2]] for b in (0, 2, 4)]
    assert "resuming: 4 of 6 prompts already sampled" in messages
    assert outputs(tmp_path / "resumed") == clean

    # Killed while writing the last line: it is dropped with a warning and its batch sampled again whole.
    progress = tmp_path / "resumed" / "samples.jsonl"
    progress.write_bytes(clean["samples.jsonl"][:-40])
    calls.clear()
    messages.clear()
    assert run(setup, tmp_path / "resumed", "--samples", "4", prompts=prompts, progress=messages.append) == 0
    assert calls == [[r.id for r in setup["records"][4:6]]]
    assert any(m.startswith(f"warning: {progress}: ignoring a cut last line") for m in messages)
    assert outputs(tmp_path / "resumed") == clean


def test_other_sampling_settings_into_the_same_out_are_refused(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(HFRolloutEngine, "generate", fake_generate(setup["records"], []))
    assert run(setup, tmp_path / "out", "--samples", "2") == 0
    before = outputs(tmp_path / "out")
    capsys.readouterr()
    assert run(setup, tmp_path / "out", "--samples", "2", "--temperature", "0.7") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path / 'out'} holds a run with other sampling settings") and \
        "temperature 1.0 -> 0.7" in err
    assert outputs(tmp_path / "out") == before
    bad = tmp_path / "out" / "samples.jsonl"
    bad.write_text(bad.read_text() + "not json\n")
    assert run(setup, tmp_path / "out", "--samples", "2") == 2
    assert f"error: {bad}:7: not a line this tool wrote" in capsys.readouterr().err


def test_user_errors_exit_2_before_generating(setup, tmp_path, monkeypatch, capsys):
    def never(self, requests, params):
        raise AssertionError("generated despite a user error")

    monkeypatch.setattr(HFRolloutEngine, "generate", never)
    out = tmp_path / "out"
    assert run({**setup, "model": tmp_path / "nope"}, out) == 2
    assert f"error: model folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "images": [], "question": "2+2?", "answer": "4"}) + "\n")
    assert run(setup, out, prompts=bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bad}:1" in err and "answer_type" in err
    assert run(setup, out, "--samples", "0") == 2
    assert "error: --samples must be >= 1, got 0" in capsys.readouterr().err
    assert run(setup, out, "--samples", "2", "--keep-shortest", "3") == 2
    assert "error: --keep-shortest must be between 1 and --samples (2), got 3" in capsys.readouterr().err
    assert run(setup, out, "--top-p", "0") == 2
    assert "0 < top_p <= 1" in capsys.readouterr().err
    assert run(setup, out, "--engine", "sglang") == 2
    assert "error: --engine must be one of hf" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_real_run_with_the_hf_engine_writes_consistent_files(setup, tmp_path):
    """A random model accepts about nothing: the summary must agree with the files, and a
    resumed run (prefix, then the whole file) with the clean one, sample for sample."""
    data = setup["data"]
    prompts = data.parent / "real.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    args = ("--samples", "3", "--temperature", "1.0", "--seed", "5")
    prompts.write_text("".join(lines))
    assert run(setup, tmp_path / "clean", *args, prompts=prompts) == 0
    prompts.write_text("".join(lines[:2]))
    assert run(setup, tmp_path / "resumed", *args, prompts=prompts) == 0
    prompts.write_text("".join(lines))
    assert run(setup, tmp_path / "resumed", *args, prompts=prompts) == 0
    out = tmp_path / "clean"
    assert outputs(tmp_path / "resumed") == outputs(out)

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [p.id for p in setup["records"]]
    responses = [rs.Response(**r) for row in rows for r in row["responses"]]
    assert len(responses) == 18 and all(1 <= r.tokens <= 8 for r in responses)
    summary = json.loads((out / "summary.json").read_text())
    sft = load_records(out / "sft.jsonl", "sft").records if (out / "sft.jsonl").read_text() else []
    assert summary["samples"] == 18 and summary["accepted"] == sum(r.accepted for r in responses)
    assert summary["kept"] == len(sft) <= summary["accepted"]
    assert sum(summary["rejected"].values()) == 18 - summary["accepted"]
    assert summary["rejected"]["cut at max_new_tokens"] == sum(not r.finished for r in responses)
    assert summary["prompts_without_accepted"] == sum(
        not any(rs.Response(**r).accepted for r in row["responses"]) for row in rows)
    assert summary["settings"]["samples"] == 3 and (out / "lengths.png").stat().st_size > 0
