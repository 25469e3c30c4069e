"""End to end: examples/mpo_rounds.sh (R1V2's iterative MPO loop) on the tiny CPU setup, shrunk.

One round on 4 synthetic prompts: the random tiny R1V is cold-started by examples/sft_rounds.sh
(ROUNDS=0) with 80 SFT steps on the 4 synthetic conversations, few enough that the model is right on
some samples and wrong or unfinished on others, so round 1's 4 samples per prompt, scored with the
hybrid reward 10 x rule + 5 x format + a tiny random image-aware reward model (Skywork-VL format,
``tools/make_tiny_checkpoint.py --reward-model skywork-vl``, served by tools/serve_reward_model.py
and sent each prompt's image), give pairs above the margin 7; the round's MPO
steps train on exactly those pairs and export a model that differs from round 0's. A rerun with
the same environment skips every finished step and leaves the same files. A round without a pair
above the margin (a random model) stops the loop with status 1 and the script's message.

The cold start uses examples/configs/tiny_sft_cpu.yaml with one conversation of each prompt per
step (sft.samples_per_step = NUM; the default 16 repeats each of the 4 conversations 4 times per
step: the same gradient at 4 times the cost), as tests/e2e/test_sft_rounds.py does.
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml

# tests/ is on sys.path (pytest.ini: pythonpath)
from rounds_scripts import files, random_model, run_script, scalars, weights

from megatron_r1v.data import validate

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "mpo_rounds.sh"
# Every knob of the script's header and of examples/sft_rounds.sh, which it runs for the cold
# start, so none leaks in from the caller's environment.
KNOBS = ("ROUNDS", "SAMPLES", "TEMPERATURE", "MAX_NEW_TOKENS", "STEPS", "PAIRS_PER_STEP", "TP", "CONFIG",
         "SEQ_LENGTH", "MAX_TILES", "MARGIN", "MAX_PAIRS_PER_PROMPT", "REWARD_CONFIG", "REWARD_SETS", "ENGINE",
         "DEVICE", "WORK", "MODEL", "PROMPTS", "NUM", "COLD_STEPS", "SFT_CONFIG", "KEEP_SHORTEST")
# 80 cold-start steps leave the model right on about half of its samples at temperature 1 (measured:
# 2 of 4 prompts with a best - worst margin of 15); SEQ_LENGTH: the configs' 320.
NUM, COLD_STEPS, STEPS, SAMPLES, TP, SEQ_LENGTH, MARGIN = 4, 80, 4, 4, 2, 320, 7.0


def _sft_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO / "examples" / "configs" / "tiny_sft_cpu.yaml").read_text())
    config["sft"]["samples_per_step"] = NUM
    path = tmp_path / "tiny_sft_cpu_test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(**knobs: str) -> subprocess.CompletedProcess:
    """bash examples/mpo_rounds.sh with exactly these knobs (and the repository's .venv as it is)."""
    return run_script(SCRIPT, KNOBS, **knobs)


def test_one_round_trains_on_the_pairs_above_the_margin_and_a_rerun_skips_everything(tmp_path, reward_tools):
    with reward_tools.serve(_reward_model(tmp_path), tmp_path / "rm.log") as server:
        assert server["kind"] == "skywork-vl", server
        _one_round_and_a_rerun(tmp_path, server["url"])


def _reward_model(tmp_path: Path) -> Path:
    out = tmp_path / "reward_model"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_checkpoint.py"), "--reward-model", "skywork-vl",
                    "--out", str(out)], check=True, capture_output=True)
    return out


def _one_round_and_a_rerun(tmp_path: Path, url: str) -> None:
    import torch

    work = tmp_path / "work"
    rewards = f"reward.rule_weight=10 reward.format_weight=5 reward.model_weight=1 reward.model_calibration=sigmoid " \
              f"reward.reward_model_url={url}"
    knobs = dict(WORK=str(work), SFT_CONFIG=str(_sft_config(tmp_path)), ROUNDS="1", NUM=str(NUM),
                 COLD_STEPS=str(COLD_STEPS), STEPS=str(STEPS), SAMPLES=str(SAMPLES), TP=str(TP),
                 SEQ_LENGTH=str(SEQ_LENGTH), PAIRS_PER_STEP=str(NUM), REWARD_SETS=rewards)
    first = _run(**knobs)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-6000:]
    r0, r1, samples = work / "round_0", work / "round_1", work / "round_1" / "samples"
    for hf in (r0 / "hf", r1 / "hf"):
        assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file(), hf
    assert f"[mpo_rounds] done: the model of the last round is {r1 / 'hf'}" in first.stdout

    # Round 1's data: both files validate, every pair is above the margin, the summary agrees.
    for name, kind in (("scored.jsonl", "scored"), ("preferences.jsonl", "preferences")):
        assert validate.main([str(samples / name), "--kind", kind]) == 0
    pairs = [json.loads(line) for line in (samples / "preferences.jsonl").read_text().splitlines()]
    summary = json.loads((samples / "summary.json").read_text())
    assert summary["prompts"] == NUM and summary["samples"] == NUM * SAMPLES
    assert 1 <= len(pairs) == summary["pairs"]["kept"] <= NUM  # one pair per prompt at most
    assert all(p["chosen_score"] - p["rejected_score"] > MARGIN for p in pairs)
    assert summary["settings"]["reward"]["rule_weight"] == 10.0 and summary["settings"]["reward"]["model_weight"] == 1
    # The reward model's term is in every total: sigmoid scores in (0, 1), graded (not constant).
    model = summary["terms"]["model"]
    assert 0.0 < model["min"] <= model["max"] < 1.0 and model["std"] > 0.0, model
    assert summary["terms"]["model_raw"]["count"] == NUM * SAMPLES, summary["terms"]["model_raw"]
    assert 15.0 < summary["terms"]["total"]["max"] < 16.0, summary["terms"]["total"]
    assert (samples / "margins.png").stat().st_size > 0

    # Round 1's MPO trained on exactly those pairs, from round 0's model, and its export moved.
    assert f"MPO pairs: kept {len(pairs)} of {len(pairs)} pairs (margin > {MARGIN:g})" in first.stdout
    assert f"reference log-probs: {len(pairs)}/{len(pairs)} pairs" in first.stdout
    losses = scalars(r1 / "tb", "mpo/loss")
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    w0, w1 = weights(r0 / "hf"), weights(r1 / "hf")
    assert w0.keys() == w1.keys() and any(not torch.equal(w0[k], w1[k]) for k in w0)

    # A rerun with the same environment: every finished step is skipped, the files stay the same.
    before = files(work)
    second = _run(**knobs)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-6000:]
    assert f"{r0 / 'hf'} exists: skipping its SFT" in second.stdout
    assert f"{r1 / 'hf'} exists: skipping its MPO" in second.stdout
    assert f"resuming: {NUM} of {NUM} prompts already sampled" in second.stderr
    for work_done in ("import done", "export done", "step 1/", "batch 1/"):
        assert work_done not in second.stdout + second.stderr, work_done
    after = files(work)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    rewritten = sorted(k for k in before if after[k][1] != before[k][1])
    assert all(k.startswith("round_1/samples/") for k in rewritten), rewritten  # outputs rebuilt, same bytes


def test_a_round_without_a_pair_above_the_margin_stops_with_status_1(tmp_path, tmp_path_factory):
    # A random model never writes a finished, well-formatted, right answer: every sample scores 0.
    model = random_model(tmp_path_factory)  # made once per session (both rounds tests use it)
    work = tmp_path / "work"
    proc = _run(WORK=str(work), MODEL=str(model), NUM="2", ROUNDS="1", SAMPLES="2", MAX_NEW_TOKENS="16")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-6000:]
    samples = work / "round_1" / "samples"
    assert (f"[mpo_rounds] round 1: no pair has a reward margin above 7 ({samples / 'summary.json'}); "
            "nothing to train on") in proc.stderr
    summary = json.loads((samples / "summary.json").read_text())
    assert summary["samples"] == 4 and summary["pairs"]["kept"] == 0 and summary["terms"]["total"]["max"] == 0.0
    assert (samples / "preferences.jsonl").read_text() == ""
    assert sorted(p.name for p in work.iterdir()) == ["data", "round_1"]  # no cold start: MODEL is given
    assert sorted(p.name for p in (work / "round_1").iterdir()) == ["samples"]  # no import, MPO or export
