"""tools/generate_preferences.py: scoring, pairs, outputs, resume, reward server and argument errors."""

import importlib.machinery
import json
import math
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from reward_stub import StandInRewardServer  # tests/ is on sys.path (pytest.ini: pythonpath)
from tool_modules import load_tool, run_sampling_tool

from megatron_r1v.data import validate
from megatron_r1v.data.schema import load_records
from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.rollout.engine import RolloutSample
from megatron_r1v.rollout.hf_engine import HFRolloutEngine

# The synthetic preference scale (10 x correct + 5 x well formatted), on which margin 7 separates
# a right, well-formatted answer (15) from a wrong one (5) or a broken one (0).
SCALE = ("--set", "reward.rule_weight=10", "--set", "reward.format_weight=5")
OUTPUTS = ("scored.jsonl", "preferences.jsonl", "summary.json", "samples.jsonl", "run.json")


gp = load_tool("generate_preferences")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random checkpoint in the skywork layout and 6 synthetic prompts."""
    root = tmp_path_factory.mktemp("generate_preferences")
    load_tool("make_tiny_checkpoint").make_tiny_checkpoint(root / "model", seed=0)
    generate_dataset(root / "data", num=6, seed=0)
    records = load_records(root / "data" / "prompts.jsonl", "prompts").records
    return {"model": root / "model", "data": root / "data" / "prompts.jsonl", "records": records}


def well_formed(answer, pad):
    return f"Let me count{' again' * pad}.\n</think>\n\nThe answer is \\boxed{{{answer}}}.<|im_end|>"


WRONG = {"choice": "Z", "number": "999"}


def fake_generate(records, calls):
    """HFRolloutEngine.generate answering sample k of a prompt by k % 5: 0 right and formatted (15),
    1 wrong (5), 2 cut before its answer (0), 3 right but with a chat token as text (left out),
    4 right with other words (15); the seed shows in the text, so a sample of another batch differs."""
    answers = {r.id: (r.answer, WRONG[r.answer_type]) for r in records}

    def generate(self, requests, params):
        calls.append([r.prompt_id for r in requests])
        groups = []
        for req in requests:
            right, wrong = answers[req.prompt_id]
            texts = [[well_formed(right, params.seed), well_formed(wrong, params.seed),
                      "Let me count \\boxed{" + right, "<|im_start|>" + well_formed(right, params.seed),
                      well_formed(right, params.seed + 3)][k % 5] for k in range(params.n)]
            groups.append([RolloutSample(req.prompt_id, torch.arange(len(t)), torch.zeros(len(t)),
                                         t.endswith("<|im_end|>"), t) for t in texts])
        return groups

    return generate


def run(setup, out, *extra, prompts=None, progress=None):
    return run_sampling_tool(gp, setup, out, *extra, prompts=prompts, progress=progress)


def outputs(out):
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_outputs_validate_and_pairs_respect_the_margin(setup, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(HFRolloutEngine, "generate", fake_generate(setup["records"], calls))
    out = tmp_path / "out"
    assert run(setup, out, "--samples", "5", "--margin-threshold", "7", *SCALE) == 0
    stdout = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(calls) == 3 and (out / "margins.png").read_bytes()[:4] == b"\x89PNG"
    for name, kind in (("scored.jsonl", "scored"), ("preferences.jsonl", "preferences")):
        assert validate.main([str(out / name), "--kind", kind]) == 0
    capsys.readouterr()

    # Per-term values of every sample in the progress file.
    terms = [(r["rule"], r["format"], r["model"], r["model_raw"], r["total"], r["finished"], r["special_text"])
             for line in jsonl(out / "samples.jsonl") for r in line["responses"]]
    assert terms == [(1.0, 1.0, 0.0, None, 15.0, True, False), (0.0, 1.0, 0.0, None, 5.0, True, False),
                     (0.0, 0.0, 0.0, None, 0.0, False, False), (1.0, 1.0, 0.0, None, 15.0, True, True),
                     (1.0, 1.0, 0.0, None, 15.0, True, False)] * 6

    # scored.jsonl: the four trainable responses, as the training template takes them.
    scored = load_records(out / "scored.jsonl", "scored").records
    by_id = {p.id: p for p in setup["records"]}
    assert [r.id for r in scored] == list(by_id)
    for record in scored:
        prompt = by_id[record.id]
        assert record.prompt == prompt.question and record.images == prompt.images
        assert [r.score for r in record.responses] == [15.0, 5.0, 0.0, 15.0]
        assert all(r.text.startswith("<think>\nLet me count") and "<|im_end|>" not in r.text for r in record.responses)

    # One pair per prompt: the first best response against the lowest one (margin 15 > 7); the
    # wrong one (10 > 7) is over the cap, the other right one (margin 0) below the margin.
    pairs = load_records(out / "preferences.jsonl", "preferences").records
    assert [p.id for p in pairs] == [f"{i}#0" for i in by_id]
    assert all(p.chosen_score - p.rejected_score == 15.0 > 7 for p in pairs)
    assert all(p.chosen == s.responses[0].text and p.rejected == s.responses[2].text for p, s in zip(pairs, scored))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == {"kept": 6, "candidates": 18, "below_margin": 6, "over_cap": 6, "prompts_with_pairs": 6,
                                "margin_threshold": 7.0, "max_pairs_per_prompt": 1, "per_prompt": {"1": 6}}
    assert summary["left_out"] == {"special token in text": 6, "empty text": 0}
    assert (summary["samples"], summary["cut_at_max_new_tokens"], summary["scored_responses"]) == (30, 6, 24)
    assert summary["terms"]["total"] == {"count": 30, "mean": 10.0, "std": pytest.approx(math.sqrt(40)),
                                         "min": 0.0, "max": 15.0}
    assert summary["terms"]["model_raw"] is None and summary["terms"]["model"]["max"] == 0.0
    assert summary["margins"]["kept"] == {"count": 6, "mean": 15.0, "std": 0.0, "min": 15.0, "max": 15.0}
    assert stdout["pairs"] == summary["pairs"] and "settings" not in stdout
    assert summary["settings"]["reward"]["rule_weight"] == 10.0

    # The margin and the cap only select: reruns re-pair without generating, strictly above the margin.
    assert run(setup, out, "--samples", "5", "--margin-threshold", "7", "--max-pairs-per-prompt", "0", *SCALE) == 0
    pairs = jsonl(out / "preferences.jsonl")
    assert [p["chosen_score"] - p["rejected_score"] for p in pairs] == [15.0, 10.0] * 6
    messages = []
    assert run(setup, out, "--samples", "5", "--margin-threshold", "15", *SCALE, progress=messages.append) == 0
    assert (out / "preferences.jsonl").read_text() == "" and len(calls) == 3
    assert f"warning: no pair has a reward margin above 15 (largest: 15); {out / 'preferences.jsonl'} is empty" \
        in messages
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"]["below_margin"] == 18 and summary["pairs"]["per_prompt"] == {"0": 6}
    assert not [p for p in tmp_path.rglob(".*")], "a temporary file was left behind"


def _RewardServer(fail_after=None):
    """The stand-in server (tests/reward_stub.py): a response with a wrong final answer scores -2,
    any other 2; after ``fail_after`` /score requests it answers 500."""
    wrong = tuple(f"\\boxed{{{w}}}" for w in WRONG.values())
    return StandInRewardServer(lambda text: -2.0 if any(w in text for w in wrong) else 2.0, fail_after)


def test_reward_model_term_over_http_and_a_server_failing_midway_resumes(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(HFRolloutEngine, "generate", fake_generate(setup["records"], []))
    server = _RewardServer()
    reward = ("--set", "reward.model_weight=0.5", "--set", "reward.model_retry_s=0",
              "--set", "reward.model_calibration=clip", "--set", "reward.model_threshold=1")
    args = ("--samples", "5", "--margin-threshold", "7", *SCALE, *reward)
    try:
        assert run(setup, tmp_path / "clean", *args, "--set", f"reward.reward_model_url={server.url}") == 0
    finally:
        server.close()
    rows = [r for line in jsonl(tmp_path / "clean" / "samples.jsonl") for r in line["responses"]]
    # clip at 1: raw 2 -> 1, raw -2 -> -2; total = 10 rule + 5 format + 0.5 model.
    assert [(r["model_raw"], r["model"], r["total"]) for r in rows[:5]] == [
        (2.0, 1.0, 15.5), (-2.0, -2.0, 4.0), (2.0, 1.0, 0.5), (2.0, 1.0, 15.5), (2.0, 1.0, 15.5)]
    summary = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert summary["terms"]["model_raw"]["min"] == -2.0 and summary["settings"]["reward_model_url"] == server.url
    # The server judged each sample once, with its question and image, without the closing marker.
    first = setup["records"][0]
    assert len(server.items) == 30 and server.items[0] == {
        "prompt": first.question, "response": well_formed(first.answer, 0).removesuffix("<|im_end|>"),
        "images": [str(first.images[0])]}
    clean = outputs(tmp_path / "clean")

    # The server fails on the second batch: status 1, the first batch kept, no output written.
    failing = _RewardServer(fail_after=1)
    out = tmp_path / "resumed"
    capsys.readouterr()
    try:
        assert run(setup, out, *args, "--set", f"reward.reward_model_url={failing.url}") == 1
    finally:
        failing.close()
    err = capsys.readouterr().err
    assert err.startswith(f"error: reward model server at {failing.url}/score") and "HTTP 500" in err
    assert "rerun the same command to resume" in err
    assert [line["id"] for line in jsonl(out / "samples.jsonl")] == [r.id for r in setup["records"][:2]]
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "samples.jsonl"]
    server = _RewardServer()  # back, on another port: the URL is not part of the run
    try:
        assert run(setup, out, *args, "--set", f"reward.reward_model_url={server.url}") == 0
    finally:
        server.close()
    # The same files; the summary records the URL it was scored at.
    resumed = outputs(out)
    assert {k: v for k, v in resumed.items() if k != "summary.json"} == \
        {k: v for k, v in clean.items() if k != "summary.json"}
    summaries = [json.loads(files["summary.json"]) for files in (clean, resumed)]
    for summary in summaries:
        summary["settings"].pop("reward_model_url")
    assert summaries[0] == summaries[1]


def test_a_reward_server_that_is_down_is_an_error_before_anything_is_loaded(setup, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("loaded the model despite the reward server being down")

    monkeypatch.setattr("megatron_r1v.evaluate.prepare_generation", never)
    server = _RewardServer()
    url = server.url
    server.close()  # nothing listens there any more
    out = tmp_path / "out"
    assert run(setup, out, "--set", "reward.model_weight=1", "--set", f"reward.reward_model_url={url}",
               "--set", "reward.model_retry_s=0") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: reward model server at {url}/health failed 1 attempt(s)")
    assert "start it (tools/serve_reward_model.py) or set reward.model_weight=0" in err
    assert not out.exists() or not any(out.iterdir())


def test_resume_after_a_crash_with_the_hf_engine_gives_the_same_files(setup, tmp_path, monkeypatch):
    """A random model: the files must agree with a clean run's after a crash in the second batch
    and a rerun, sample for sample."""
    args = ("--samples", "3", "--temperature", "1.0", "--seed", "5", "--margin-threshold", "0.5")
    assert run(setup, tmp_path / "clean", *args) == 0
    real = HFRolloutEngine.generate
    calls = []

    def crash_in_batch_2(self, requests, params):
        calls.append([r.prompt_id for r in requests])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while generating
        return real(self, requests, params)

    monkeypatch.setattr(HFRolloutEngine, "generate", crash_in_batch_2)
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path / "resumed", *args)
    assert run(setup, tmp_path / "resumed", *args) == 0
    ids = [r.id for r in setup["records"]]
    assert calls == [ids[0:2], ids[2:4], ids[2:4], ids[4:6]]
    clean = outputs(tmp_path / "clean")
    assert outputs(tmp_path / "resumed") == clean

    # Killed while writing the last line: dropped with a warning and its batch sampled again whole.
    progress = tmp_path / "resumed" / "samples.jsonl"
    progress.write_bytes(clean["samples.jsonl"][:-40])
    calls.clear()
    messages = []
    assert run(setup, tmp_path / "resumed", *args, progress=messages.append) == 0
    assert calls == [ids[4:6]] and "resuming: 5 of 6 prompts already sampled" in messages
    assert outputs(tmp_path / "resumed") == clean
    for name, kind in (("scored.jsonl", "scored"), ("preferences.jsonl", "preferences")):
        assert validate.main([str(tmp_path / "clean" / name), "--kind", kind]) == 0
    summary = json.loads(clean["summary.json"])
    assert summary["samples"] == 18 and summary["terms"]["total"]["count"] == 18


@pytest.mark.parametrize("extra, message", [
    (("--samples", "0"), "--samples must be >= 1, got 0"),
    (("--margin-threshold", "-1"), "--margin-threshold must be a finite number >= 0, got -1.0"),
    (("--margin-threshold", "nan"), "--margin-threshold must be a finite number >= 0, got nan"),
    (("--max-pairs-per-prompt", "-1"), "--max-pairs-per-prompt must be >= 0"),
    (("--engine", "vllm"), "--engine must be one of hf, sglang, got 'vllm'"),
    (("--engine", "sglang"), "--engine sglang needs a CUDA GPU"),
    (("--engine", "sglang", "--device", "cpu"), "--engine sglang runs on a GPU; --device must be cuda"),
    (("--tp", "2"), "--tp must be >= 1 and is for --engine sglang only, got 2"),
    (("--set", "train.steps=3"), "--set 'train.steps=3': only reward.* keys can be set here"),
    (("--set", "reward.rule_wieght=3"), "--reward-config / --set: unknown config key 'reward.rule_wieght'"),
    (("--set", "reward.model_weight=1"),
     "--reward-config / --set: reward.model_weight=1 needs reward.reward_model_url"),
    (("--reward-config", "/nonexistent.yaml"), "--reward-config / --set: config file /nonexistent.yaml does not exist"),
])
def test_user_errors_exit_2_naming_the_flag_before_generating(setup, tmp_path, monkeypatch, capsys, extra, message):
    def never(*args, **kwargs):
        raise AssertionError("loaded the model despite a user error")

    monkeypatch.setattr("megatron_r1v.evaluate.prepare_generation", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert run(setup, out, *extra) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not out.exists() or not any(out.iterdir())


def test_other_reward_weights_into_the_same_out_are_refused(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(HFRolloutEngine, "generate", fake_generate(setup["records"], []))
    config = tmp_path / "run.yaml"
    config.write_text("reward:\n  rule_weight: 10\n  format_weight: 5\n")
    assert run(setup, tmp_path / "out", "--samples", "2", "--reward-config", str(config)) == 0
    before = outputs(tmp_path / "out")
    # The same reward from --set instead of the file is the same run.
    assert run(setup, tmp_path / "out", "--samples", "2", *SCALE) == 0
    assert outputs(tmp_path / "out") == before
    capsys.readouterr()
    assert run(setup, tmp_path / "out", "--samples", "2", "--reward-config", str(config),
               "--set", "reward.format_weight=1") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path / 'out'} holds a run with other sampling settings") and \
        "'format_weight': 5.0" in err and "'format_weight': 1.0" in err
    assert outputs(tmp_path / "out") == before


def _fake_sglang(monkeypatch, tokenizer):
    """A stand-in ``sglang`` package: its Engine answers every request with a right, formatted reply."""
    built = []

    class Engine:
        def __init__(self, **kwargs):
            self.kwargs, self.requests, self.shut_down = kwargs, [], False
            built.append(self)

        def shutdown(self):
            self.shut_down = True

        def generate(self, input_ids, sampling_params, return_logprob, image_data=None):
            self.requests.append((len(input_ids), sampling_params, image_data))
            ids = tokenizer.encode("Let me count.\n</think>\n\nThe answer is \\boxed{B}.<|im_end|>",
                                   add_special_tokens=False)
            return [{"output_ids": ids, "meta_info": {"finish_reason": {"type": "stop"},
                                                      "output_token_logprobs": [(-0.5, t, None) for t in ids]}}
                    for _ in input_ids]

    modules = {"sglang": {"Engine": Engine, "__version__": "0.5.23"}, "sglang.srt": {},
               "sglang.srt.constants": {},
               "sglang.srt.utils": {"MultiprocessingSerializer": SimpleNamespace(serialize=None)},
               "sglang.srt.weight_sync": {}, "sglang.srt.weight_sync.tensor_bucket": {"FlattenedTensorBucket": None}}
    for name, values in modules.items():
        module = ModuleType(name)
        module.__dict__.update(values)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # found by importlib.util.find_spec
        monkeypatch.setitem(sys.modules, name, module)
    return built


def test_sglang_engine_is_wired_through_the_rollout_engine_adapter(setup, tmp_path, monkeypatch):
    """--engine sglang at the unit boundary: a fake sglang.Engine behind the real SGLangRolloutEngine
    (no GPU or SGLang here; the real engine is not exercised)."""
    from megatron_r1v.data.tokenizer import load_tokenizer

    built = _fake_sglang(monkeypatch, load_tokenizer(setup["model"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("SGLANG_VLM_CACHE_SIZE_MB", "0")
    out = tmp_path / "out"
    assert run(setup, out, "--engine", "sglang", "--device", "cuda:1", "--tp", "2", "--samples", "2",
               "--margin-threshold", "0") == 0
    (engine,) = built
    assert {k: engine.kwargs[k] for k in ("model_path", "base_gpu_id", "tp_size", "mem_fraction_static")} == \
        {"model_path": str(setup["model"]), "base_gpu_id": 1, "tp_size": 2, "mem_fraction_static": 0.85}
    assert engine.shut_down  # its processes stopped once the sampling was done
    # 3 batches of 2 prompts x 2 samples, each sample its own request with the template's stop token.
    assert [n for n, _, _ in engine.requests] == [4, 4, 4]
    assert all(p["stop_token_ids"] and p["max_new_tokens"] == 8 for _, params, _ in engine.requests for p in params)
    assert all(image and "pixel_values" in image[0] for _, _, images in engine.requests for image in images)
    rows = [r for line in jsonl(out / "samples.jsonl") for r in line["responses"]]
    assert len(rows) == 12 and all(r["finished"] and r["format"] == 1.0 for r in rows)
    assert json.loads((out / "run.json").read_text())["engine"] == "sglang"
    assert validate.main([str(out / "scored.jsonl"), "--kind", "scored"]) == 0


def test_margin_histogram_with_no_candidate_or_a_single_margin(tmp_path):
    """Every prompt answered with one distinct text leaves no candidate pair; one pair, one margin."""
    from megatron_r1v.plotting import plot_histograms

    for name, series in (("none.png", {"every candidate pair": [], "kept": []}),
                         ("one.png", {"every candidate pair": [15.0], "kept": [15.0]})):
        plot_histograms(series, tmp_path / name, xlabel="margin", marks={"threshold 7": 7.0})
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.png", "one.png"]  # no temporary left
