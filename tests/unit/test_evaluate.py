"""python -m megatron_r1v.evaluate: held-out accuracy of a tiny random checkpoint."""

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
from megatron_r1v.evaluate import evaluate, main, score_text
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


def recompute(model_dir, data_path, batch_size):
    """An independent evaluation: the same prompts made by hand, greedy generation batch by
    batch, and the rewards' own functions."""
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tiling import PILTiler, TilingConfig
    from megatron_r1v.rewards.format import check_format, extract_answer
    from megatron_r1v.rewards.rule import rule_reward
    from megatron_r1v.rollout.engine import RolloutRequest, SamplingParams
    from megatron_r1v.rollout.hf_engine import load_hf_engine

    records = load_records(data_path, "prompts").records
    engine, arch, tokenizer = load_hf_engine(model_dir)
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=arch.tokens_per_tile,
                                                      max_seq_len=arch.decoder.max_position_embeddings - MAX_NEW))
    tiler = PILTiler(TilingConfig(image_size=arch.vision.image_size, max_tiles=12))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = []
    for start in range(0, len(records), batch_size):
        requests = []
        for r in records[start:start + batch_size]:
            images = tiler.tile_files(r.images).kept()
            ids = template.prompt_ids(r.id, r.question, [img.num_tiles for img in images])
            requests.append(RolloutRequest(r.id, ids, torch.cat([img.pixel_values for img in images])))
        groups = engine.generate(requests, SamplingParams(n=1, temperature=0, max_new_tokens=MAX_NEW,
                                                          stop_token_ids=(im_end,)))
        texts += [g[0].text for g in groups]
    correct = [rule_reward(extract_answer(t), r.answer, r.answer_type, r.choices) for r, t in zip(records, texts)]
    fmt = [check_format(t, think_opened_by_prompt=True).score for t in texts]
    return records, texts, correct, fmt


def test_accuracy_equals_an_independent_recomputation(setup, tmp_path):
    samples = tmp_path / "samples.jsonl"
    lines = []
    result = evaluate(setup["model"], setup["data"], max_new_tokens=MAX_NEW, batch_size=4, samples_out=samples,
                      progress=lines.append)
    records, texts, correct, fmt = recompute(setup["model"], setup["data"], batch_size=4)
    assert result["num_prompts"] == 6 and result["model"] == str(setup["model"])
    assert result["accuracy"] == sum(correct) / 6 and result["format"] == sum(fmt) / 6
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert [r["text"] for r in rows] == texts and all(t for t in texts)  # the same greedy generations
    assert [r["correct"] for r in rows] == [c == 1.0 for c in correct]
    types = {r.answer_type for r in records}
    assert set(result["by_answer_type"]) == types == {"choice", "number"}
    assert sum(v["num_prompts"] for v in result["by_answer_type"].values()) == 6
    # The default data.tiler=auto tiles with DALI here (bit-identical to the PILTiler of recompute()).
    assert lines[0] == "tiler: dali (r1v.internvl_tiles, 2 threads)" == "tiler: " + result["tiler"]
    assert len(lines) == 3 and lines[-1].startswith("batch 2/2 | prompts 6/6")
    assert result["seconds"] > 0 and 6 <= result["generated_tokens"] <= 6 * MAX_NEW


def forced_generate(texts_by_id):
    """A stand-in for HFRolloutEngine.generate that answers each prompt with a fixed text."""

    def generate(self, requests, params):
        assert params.temperature == 0 and params.n == 1
        return [[RolloutSample(r.prompt_id, torch.tensor([1]), torch.tensor([0.0]), True, texts_by_id[r.prompt_id])]
                for r in requests]

    return generate


def well_formed(answer):
    return f"Let me count.\n</think>\n\nThe answer is \\boxed{{{answer}}}.<|im_end|>"


def test_right_boxed_answers_score_one_and_wrong_ones_zero(setup, monkeypatch):
    records = load_records(setup["data"], "prompts").records
    monkeypatch.setattr(HFRolloutEngine, "generate", forced_generate({r.id: well_formed(r.answer) for r in records}))
    result = evaluate(setup["model"], setup["data"], max_new_tokens=MAX_NEW, batch_size=4, progress=None)
    assert result["accuracy"] == 1.0 and result["format"] == 1.0
    assert all(v["accuracy"] == 1.0 for v in result["by_answer_type"].values())

    # Every other prompt answered wrongly; the first one also without a closed thought.
    wrong = {r.id: (well_formed(r.answer) if i % 2 else well_formed("Z" if r.answer_type == "choice" else "999"))
             for i, r in enumerate(records)}
    wrong[records[0].id] = "no thought \\boxed{1}<|im_end|>"
    monkeypatch.setattr(HFRolloutEngine, "generate", forced_generate(wrong))
    result = evaluate(setup["model"], setup["data"], max_new_tokens=MAX_NEW, batch_size=4, progress=None)
    assert result["accuracy"] == 0.5 and result["format"] == 5 / 6
    for answer_type, summary in result["by_answer_type"].items():
        group = [i for i, r in enumerate(records) if r.answer_type == answer_type]
        assert summary["accuracy"] == sum(i % 2 for i in group) / len(group)


def test_score_text_reads_the_last_box_after_the_thought(setup):
    record = load_records(setup["data"], "prompts").records[0]
    assert score_text(record, well_formed(record.answer)) == score_text(record, well_formed(record.answer), True)
    score = score_text(record, well_formed(record.answer))
    assert score.correct and score.format_ok and score.extracted == record.answer
    # The prompt opened <think>: a completion that opens it again is malformed but still right.
    doubled = score_text(record, "<think>\n" + well_formed(record.answer))
    assert doubled.correct and not doubled.format_ok
    cut = score_text(record, "thinking about \\boxed{" + record.answer)
    assert cut.extracted is None and not cut.correct and not cut.format_ok


def test_cli_prints_and_writes_the_result(setup, tmp_path):
    out, samples = tmp_path / "res" / "result.json", tmp_path / "samples.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_r1v.evaluate", "--model", str(setup["model"]), "--data",
                           str(setup["data"]), "--max-new-tokens", "4", "--limit", "3", "--batch-size", "2",
                           "--out", str(out), "--samples-out", str(samples), "--tiler", "pil", "--tiler-threads", "1"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert result["num_prompts"] == 3 and set(result) >= {"accuracy", "format", "num_prompts", "by_answer_type",
                                                          "seconds", "model", "tiler"}
    assert result["tiler"] == "pil (1 thread; --tiler=pil)" and "tiler: pil (1 thread" in proc.stderr
    assert len(samples.read_text().splitlines()) == 3
    assert "batch 1/2 | prompts 2/3" in proc.stderr and "batch 2/2 | prompts 3/3" in proc.stderr
    assert not [p for p in tmp_path.rglob(".*")], "a temporary file was left behind"


def test_user_errors_exit_2_with_a_message(setup, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--data", str(setup["data"])]) == 2
    assert f"error: model folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "images": [], "question": "2+2?", "answer": "4"}) + "\n")
    assert main(["--model", str(setup["model"]), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bad}:1" in err and "answer_type" in err
    assert main(["--model", str(setup["model"]), "--data", str(setup["data"]), "--temperature", "-1"]) == 2
    assert "need temperature >= 0" in capsys.readouterr().err
    assert main(["--model", str(setup["model"]), "--data", str(setup["data"]), "--max-new-tokens", "5000"]) == 2
    assert "leaves no room for a prompt" in capsys.readouterr().err
    assert main(["--model", str(setup["model"]), "--data", str(setup["data"]), "--tiler-threads", "0"]) == 2
    assert "error: --tiler-threads must be >= 1, got 0" in capsys.readouterr().err
