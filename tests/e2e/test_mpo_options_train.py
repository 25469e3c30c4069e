"""End to end: the tiny R1V's MPO stage (TP=2, CPU) with InternVL/TRL's choices,
``mpo.bco_delta=trl_running_mean`` and ``mpo.nll_normalization=token``: each step's delta
is the mean implicit reward of every step so far, this one included (read by the
forward-only pre-pass before the step), and ``--resume`` continues bit-identically (the
running mean is checkpointed as with the default mode)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
STEPS = 4


def _run(tmp_path, name, *extra) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "megatron_r1v.train", "--config", str(REPO / "examples/configs/tiny_mpo_cpu.yaml"),
               "--set", f"data.train_path={tmp_path / 'data' / 'preferences.jsonl'}",
               "--set", f"data.tokenizer={tmp_path / 'tok'}", "--set", f"train.steps={STEPS}",
               "--set", "mpo.pairs_per_step=4", "--set", "train.save_interval=2",
               "--set", "logging.tensorboard_dir=null",
               "--set", "mpo.bco_delta=trl_running_mean", "--set", "mpo.nll_normalization=token",
               # One reference cache for every run (the initial weights' log-probs, computed once).
               "--set", f"mpo.reference_cache={tmp_path / 'reference'}",
               "--set", f"train.save_dir={tmp_path / name}", "--metrics-jsonl", str(tmp_path / f"{name}.jsonl"), *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


def test_trl_options_train_and_resume(tmp_path):
    generate_dataset(tmp_path / "data", 20, seed=0)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "preferences.jsonl"], 640,
                    tmp_path / "tok")
    full = _run(tmp_path, "full")
    assert len(full) == STEPS
    # Every step has 4 pairs, so the mean of all rewards so far is the mean of the steps' means;
    # the pre-pass reads the rewards the step's own forward then reports (same weights; the
    # pre-pass sums the fp32 log-probs in fp64, the loss in fp32: r = beta (log pi - log pi_ref)
    # of ~-300 nats agrees to ~1e-5).
    step_means = [(m["mpo/chosen_reward"] + m["mpo/rejected_reward"]) / 2 for m in full]
    for k, m in enumerate(full):
        assert m["mpo/delta"] == pytest.approx(sum(step_means[:k + 1]) / (k + 1), rel=1e-4, abs=2e-5), k
    assert abs(full[0]["mpo/delta"]) < 1e-5  # step 0: the policy is the reference, every reward ~0
    assert full[-1]["mpo/delta"] != 0.0

    _run(tmp_path, "split", "--stop-after", str(STEPS // 2))
    split = _run(tmp_path, "split", "--resume")
    assert len(split) == STEPS
    for a, b in zip(full, split):  # timings differ; nothing else may
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == \
               {k: v for k, v in b.items() if not k.startswith("perf/")}, a["step"]
