"""End to end: examples/sft_rounds.sh (R1V's iterative SFT loop) on the tiny CPU setup, shrunk.

Two rounds on 4 synthetic prompts. The random tiny R1V is cold-started with 100 SFT steps on the
4 synthetic conversations (it memorizes them: loss 6.47 -> 0.03, measured), so round 1's rejection
sampling (4 samples per prompt) accepts responses (measured 16 of 16, 4 distinct texts kept); each
round's 10 SFT steps train on exactly the kept responses and export a model that differs from the
one it sampled from, which the next round samples from. A rerun with the same environment skips
every finished step and leaves the same files. A round that accepts nothing (a random model) stops
the loop with status 1 and the script's message.

The runs use examples/configs/tiny_sft_cpu.yaml (the script's CONFIG) with one conversation of
each prompt per step (sft.samples_per_step = NUM; the default 16 would repeat each of the 4
conversations 4 times per step: the same gradient at 4 times the cost) and a progress line per step.
"""

import json
import math
import subprocess
from pathlib import Path

import yaml

# tests/ is on sys.path (pytest.ini: pythonpath)
from rounds_scripts import files, random_model, run_script, scalars, weights

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "sft_rounds.sh"
# Every knob the script reads (its header), so none leaks in from the caller's environment.
KNOBS = ("ROUNDS", "SAMPLES", "KEEP_SHORTEST", "TEMPERATURE", "MAX_NEW_TOKENS", "STEPS", "TP", "CONFIG",
         "SEQ_LENGTH", "MAX_TILES", "WORK", "MODEL", "PROMPTS", "NUM", "COLD_STEPS")
# The smallest setup whose rounds accept responses with a margin (measured on 4 prompts x 4 samples):
# 80 cold-start steps accept 12 of 16 samples in round 1 (loss 0.13), 100 accept 16 of 16 (loss
# 0.03); 60 steps on 8 prompts (loss 0.78) accept none. A round's SFT starts a fresh Adam whose first
# step raises the loss on the model's own samples (0.03 -> 1.11 with TP=1, 0.63 with TP=2); with TP=2,
# 4 steps left it at 0.13 and round 2 accepted 2-4 of 16, 10 steps bring it back to 0.03 and round 2
# accepts 12 of 16 (TP=1; 16 of 16 with TP=2). TP=1: the same loop with 40% less CPU time than TP=2
# (100 s against 175 s for the first run); the TP=2 import, SFT and export are tested by
# test_sft_train.py and tests/distributed. SEQ_LENGTH: the config's 320 (the synthetic conversations
# have 120-270 tokens with their tiles); MAX_NEW_TOKENS: the default 96 (the accepted responses have
# 46-54 tokens).
NUM, COLD_STEPS, ROUNDS, STEPS, SAMPLES, TP, SEQ_LENGTH = 4, 100, 2, 10, 4, 1, 320


def _config(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO / "examples" / "configs" / "tiny_sft_cpu.yaml").read_text())
    config["sft"]["samples_per_step"] = NUM
    config["logging"]["log_interval"] = 1
    path = tmp_path / "tiny_sft_cpu_test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(**knobs: str) -> subprocess.CompletedProcess:
    """bash examples/sft_rounds.sh with exactly these knobs (and the repository's .venv as it is)."""
    return run_script(SCRIPT, KNOBS, **knobs)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_round(work: Path, r: int, stdout: str) -> None:
    """Round ``r``'s samples (from round r-1's export), its SFT on the kept ones and its export."""
    import torch

    prev, cur = work / f"round_{r - 1}", work / f"round_{r}"
    assert (cur / "hf" / "config.json").is_file() and (cur / "hf" / "tokenizer.json").is_file()
    for name in ("sft.jsonl", "summary.json", "samples.jsonl", "run.json", "lengths.png"):
        assert (cur / "samples" / name).is_file(), name

    # The samples: summary.json agrees with samples.jsonl and sft.jsonl.
    summary = json.loads((cur / "samples" / "summary.json").read_text())
    assert summary["settings"]["model"] == str(prev / "hf") and summary["settings"]["seed"] == r
    prompts = {p["id"]: p for p in _jsonl(work / "data" / "prompts.jsonl")}
    sampled = {p["id"]: p["responses"] for p in _jsonl(cur / "samples" / "samples.jsonl")}
    kept = _jsonl(cur / "samples" / "sft.jsonl")
    assert len(prompts) == NUM and set(sampled) == set(prompts)
    assert summary["prompts"] == NUM and summary["samples"] == NUM * SAMPLES
    assert all(len(responses) == SAMPLES for responses in sampled.values())
    accepted = [(pid, i) for pid, responses in sampled.items() for i, x in enumerate(responses)
                if x["finished"] and x["format_ok"] and x["correct"]]
    assert summary["accepted"] == len(accepted) == summary["samples"] - sum(summary["rejected"].values())
    assert summary["acceptance_rate"] == summary["accepted"] / summary["samples"]
    # Measured: 16 and 12 of 16 accepted in rounds 1 and 2, one distinct text per prompt kept.
    assert summary["accepted"] >= NUM * SAMPLES // 2, summary
    assert 1 <= summary["kept"] == len(kept) <= summary["accepted"]
    assert summary["prompts_without_accepted"] == NUM - len({pid for pid, _ in accepted})
    assert sum(t["samples"] for t in summary["by_answer_type"].values()) == summary["samples"]
    assert sum(t["accepted"] for t in summary["by_answer_type"].values()) == summary["accepted"]
    kept_tokens = 0
    for record in kept:  # each kept line is an accepted sample, its text unchanged, each text once
        pid, index = record["id"].split("#k")
        response = sampled[pid][int(index)]
        assert (pid, int(index)) in accepted, record["id"]
        user, assistant = record["messages"]
        assert user == {"role": "user", "content": prompts[pid]["question"]}
        assert assistant["role"] == "assistant" and assistant["content"] == "<think>\n" + response["text"]
        assert f"\\boxed{{{prompts[pid]['answer']}}}" in response["text"]
        kept_tokens += response["tokens"]
    assert len({(x["messages"][0]["content"], x["messages"][1]["content"]) for x in kept}) == len(kept)

    # The SFT trained on those responses: its data are the kept lines, its labels the sampled
    # tokens (reply and <|im_end|>: measured 199 per step = the 4 kept responses' 46 + 52 + 47 +
    # 54), and the model's own samples start at a low loss (measured 0.03 and 0.04).
    step_msg = (f"[sft_rounds] round {r}/{ROUNDS}: SFT on {len(kept)} kept responses (accepted, each distinct "
                f"text once), {STEPS} steps")
    assert step_msg in stdout
    log = stdout.split(step_msg, 1)[1].split("\n[sft_rounds] ", 1)[0]
    assert f"SFT conversations: {len(kept)} (0 skipped); {STEPS} steps x {NUM} = " in log
    assert [line.split(" |")[0] for line in log.splitlines() if line.startswith("step ")] == \
        [f"step {i}/{STEPS}" for i in range(1, STEPS + 1)]
    assert "export done in " in log and str(cur / "hf") in log
    losses = scalars(cur / "tb", "sft/loss")
    tokens = scalars(cur / "tb", "sft/assistant_tokens")
    assert len(losses) == len(tokens) == STEPS and all(math.isfinite(x) and x > 0 for x in losses), losses
    # Measured 0.03 -> 1.11 (the first step of a fresh Adam at lr 2e-3) -> 0.03 in round 1.
    assert losses[0] < 0.3 and losses[-1] < 0.3, losses
    epochs, rest = divmod(STEPS * NUM, len(kept))  # NUM conversations per step (the test's config)
    if rest == 0:  # whole epochs over the kept conversations (the measured case: 4 kept, 4 per step)
        assert sum(tokens) == epochs * kept_tokens, (tokens, kept_tokens)
    assert all(t > 0 for t in tokens)

    # The export is the trained model: round r-1's tensors and settings, other values.
    w0, w1 = weights(prev / "hf"), weights(cur / "hf")
    assert w0.keys() == w1.keys() and all(w0[k].shape == w1[k].shape for k in w0)
    changed = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert len(changed) == len(w0), sorted(set(w0) - set(changed))  # measured: all 87 tensors moved
    assert json.loads((prev / "hf" / "config.json").read_text()) == json.loads((cur / "hf" / "config.json").read_text())
    assert (prev / "hf" / "tokenizer.json").read_bytes() == (cur / "hf" / "tokenizer.json").read_bytes()


def test_two_rounds_train_on_the_accepted_responses_and_a_rerun_skips_everything(tmp_path):
    work = tmp_path / "work"
    knobs = dict(WORK=str(work), CONFIG=str(_config(tmp_path)), ROUNDS=str(ROUNDS), NUM=str(NUM),
                 COLD_STEPS=str(COLD_STEPS), STEPS=str(STEPS), SAMPLES=str(SAMPLES), TP=str(TP),
                 SEQ_LENGTH=str(SEQ_LENGTH))
    first = _run(**knobs)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-6000:]
    assert (work / "round_0" / "hf" / "config.json").is_file()
    assert f"[sft_rounds] done: the model of the last round is {work / f'round_{ROUNDS}' / 'hf'}" in first.stdout

    # Round 0: the cold start on the synthetic conversations, from a random model (CE ~ ln 640).
    cold = scalars(work / "round_0" / "tb", "sft/loss")
    assert len(cold) == COLD_STEPS and abs(cold[0] - math.log(640)) < 0.15 and cold[-1] < 0.3, cold[::10]
    for r in range(1, ROUNDS + 1):
        _check_round(work, r, first.stdout)

    # A rerun with the same environment: every finished step is skipped, the files stay the same.
    before = files(work)
    second = _run(**knobs)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-6000:]
    out = second.stdout + second.stderr
    for r in range(ROUNDS + 1):
        assert f"{work / f'round_{r}' / 'hf'} exists: skipping its SFT" in second.stdout, r
    assert second.stderr.count(f"resuming: {NUM} of {NUM} prompts already sampled") == ROUNDS
    for work_done in (f"wrote {NUM} samples", "num_parameters", "import done", "export done", "SFT conversations",
                      "step 1/"):
        assert work_done not in out, work_done
    summaries = [line for line in first.stdout.splitlines() if line.startswith('{"prompts"')]
    assert len(summaries) == ROUNDS
    assert [line for line in second.stdout.splitlines() if line.startswith('{"prompts"')] == summaries
    after = files(work)
    assert after.keys() == before.keys()
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    # Only the sampling outputs are rewritten (the same bytes); nothing else is touched.
    rewritten = sorted(k for k in before if after[k][1] != before[k][1])
    assert all(Path(k).parts[1:2] == ("samples",) for k in rewritten), rewritten


def test_a_round_with_no_accepted_response_stops_with_status_1(tmp_path, tmp_path_factory):
    # A random model never writes a finished, well-formatted, right answer (here in 16 tokens).
    model = random_model(tmp_path_factory)  # made once per session (both rounds tests use it)
    knobs = dict(ROUNDS="1", SAMPLES="2", MAX_NEW_TOKENS="16", MODEL=str(model))

    # MODEL without PROMPTS: synthetic prompts, and no cold start (the model is given).
    work = tmp_path / "synthetic_prompts"
    proc = _run(WORK=str(work), NUM="2", **knobs)
    _check_stopped(proc, work, prompts=2, samples=2)
    assert (work / "data" / "prompts.jsonl").is_file()
    assert not (work / "hf_random").exists() and not (work / "round_0").exists()
    assert "cold-start" not in proc.stdout

    # MODEL and PROMPTS: nothing but the round.
    work = tmp_path / "given_prompts"
    proc = _run(WORK=str(work), PROMPTS=str(tmp_path / "synthetic_prompts" / "data" / "prompts.jsonl"), **knobs)
    _check_stopped(proc, work, prompts=2, samples=2)
    assert sorted(p.name for p in work.iterdir()) == ["round_1"]


def _check_stopped(proc: subprocess.CompletedProcess, work: Path, prompts: int, samples: int) -> None:
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-6000:]
    samples_dir = work / "round_1" / "samples"
    assert (f"[sft_rounds] round 1: no response was accepted ({samples_dir / 'summary.json'}); "
            "nothing to train on") in proc.stderr
    summary = json.loads((samples_dir / "summary.json").read_text())
    assert summary["prompts"] == prompts and summary["samples"] == prompts * samples
    assert summary["accepted"] == summary["kept"] == 0 and summary["prompts_without_accepted"] == prompts
    assert sum(summary["rejected"].values()) == prompts * samples
    assert (samples_dir / "sft.jsonl").read_text() == ""
    assert sorted(p.name for p in (work / "round_1").iterdir()) == ["samples"]  # no import, SFT or export
    assert "SFT on" not in proc.stdout and "[sft_rounds] done" not in proc.stdout
