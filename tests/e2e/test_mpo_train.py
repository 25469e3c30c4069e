"""End to end: the MPO stage of the tiny R1V with TP=2 on CPU.

Writes every TensorBoard tag, caches the reference log-probs and reuses them (a resumed
run) or recomputes them (changed data), resumes bit-identically, and its checkpoint
exports to an HF checkpoint that the next stage can start from.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tool_modules import run_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.tokenizer import build_tokenizer
from megatron_r1v.trainer.metrics import stage_tags

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _run(tmp_path, name, steps, *extra, data="data", expect_ok=True):
    proc = subprocess.run(_command(tmp_path, name, steps, *extra, data=data), capture_output=True, text=True,
                          timeout=900, env=ENV, cwd=tmp_path)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _command(tmp_path, name, steps, *extra, data="data") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "megatron_r1v.train", "--config", str(REPO / "examples/configs/tiny_mpo_cpu.yaml"),
           "--set", f"data.train_path={tmp_path / data / 'preferences.jsonl'}", "--set", f"data.tokenizer={tmp_path / 'tok'}",
           "--set", f"logging.tensorboard_dir={tmp_path / name / 'tb'}", "--set", f"train.steps={steps}",
           "--set", "mpo.pairs_per_step=4", "--set", "logging.log_interval=1", "--set", "train.save_interval=3",
           # A decaying learning rate, so the resumed run must also restore the schedule.
           "--set", "optimizer.lr_decay_style=cosine", "--set", "optimizer.min_lr=1.0e-4",
           "--set", f"train.save_dir={tmp_path / name}", "--metrics-jsonl", str(tmp_path / f"{name}.jsonl"), *extra]


def _metrics(tmp_path, name) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


def _resume_copy(tmp_path, name: str, step_dir: str = "step_000003"):
    """A save dir holding only ``full``'s checkpoint ``step_dir`` and its reference cache."""
    (tmp_path / name).mkdir()
    shutil.copytree(tmp_path / "full" / step_dir, tmp_path / name / step_dir)
    shutil.copytree(tmp_path / "full" / "reference_logprobs", tmp_path / name / "reference_logprobs")
    (tmp_path / name / "latest").write_text(step_dir + "\n")


def _resume_at_other_layouts(tmp_path, full_metrics):
    """The TP=2 checkpoint of step 3 resumed at TP=1 x DP=2 with the distributed optimizer
    (its state sharded over DP), and at PP=2 for two steps whose checkpoint is resumed at
    TP=2 x PP=1 for the last, continues as the uninterrupted TP=2 run: the model, Adam's
    moments and step, BCO's running mean, the cursor and the schedule all carried over
    (trainer/checkpoint.py). Tolerance: the layouts sum the same fp32 numbers in other
    orders (TP splits the GEMMs, DP all-reduces the gradients); measured worst relative
    difference 1.4e-6 over every metric of steps 4-6 (rejected reward), so 2e-5."""
    import torch

    from megatron_r1v.checkpoint.torch_dist_io import TorchDistReader

    layouts = {"tp1dp2": ["--set", "parallel.tp=1", "--set", "optimizer.use_distributed_optimizer=true"],
               "pp2": ["--set", "parallel.tp=1", "--set", "parallel.pp=2", "--stop-after", "2"]}
    drop = ("perf/",)
    for name, sets in layouts.items():
        _resume_copy(tmp_path, name)
        proc = _run(tmp_path, name, 6, "--resume", *sets)
        assert "resumed from" in proc.stdout and "after step 3" in proc.stdout
        assert "saved at {'tp': 2, 'pp': 1, 'dp': 1, 'world_size': 2}" in proc.stdout  # the layout change said
        assert "pairs from" in proc.stdout  # the reference cache of the TP=2 random initialization found
    back = _run(tmp_path, "pp2", 6, "--resume")  # PP=2 -> PP=1 (the recipe's TP=2)
    assert "after step 5" in back.stdout and "saved at {'tp': 1, 'pp': 2, 'dp': 1" in back.stdout
    for name in layouts:
        resumed = _metrics(tmp_path, name)
        assert [m["step"] for m in resumed] == [3, 4, 5]
        for a, b in zip(full_metrics[3:], resumed):
            expected = {k: v for k, v in a.items() if not k.startswith(drop)}
            assert {k: v for k, v in b.items() if not k.startswith(drop)} == pytest.approx(
                expected, rel=2e-5, abs=1e-7), (name, a["step"])
    # Saving from the distributed optimizer: each DP rank's range of every parameter,
    # gathered, is the same Adam state as the TP=2 run's. Same relative tolerance, against
    # each tensor's largest entry: entries near zero are sums that cancel, whose rounding
    # is that of their largest terms.
    full_state = TorchDistReader(tmp_path / "full" / "step_000006" / "state")
    dopt_state = TorchDistReader(tmp_path / "tp1dp2" / "step_000006" / "state")
    keys = sorted(k for k in full_state.keys() if k.startswith("optimizer/"))
    assert keys == sorted(dopt_state.keys()) and any("exp_avg_sq/" in k for k in keys)
    for key in keys:
        expected = full_state.read(key)
        torch.testing.assert_close(dopt_state.read(key), expected, rtol=2e-5, atol=2e-5 * float(expected.abs().max()),
                                   msg=lambda m: f"{key}: {m}")


def test_mpo_trains_caches_resumes_and_exports(tmp_path):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_r1v.checkpoint.torch_dist_io import TorchDistReader

    generate_dataset(tmp_path / "data", 20, seed=0)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "preferences.jsonl"], 640,
                    tmp_path / "tok")
    full = _run(tmp_path, "full", 6)
    assert "reference log-probs: " in full.stdout and "/20 pairs" not in full.stdout  # margin 7 drops some pairs
    kept = int(full.stdout.split("MPO pairs: kept ")[1].split(" ")[0])
    assert 5 <= kept < 20
    lines = [line for line in full.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == [f"step {i}/6" for i in range(1, 7)]
    # data.tiler=auto with DALI installed; rank 0 tiles for both TP ranks (data/replica_tiling.py).
    assert "tiler: dali (r1v.internvl_tiles, 2 threads) on 1 rank per replica (tp 2 x pp 1)" in full.stdout
    events = EventAccumulator(str(tmp_path / "full" / "tb"))
    events.Reload()
    assert set(stage_tags("mpo")) <= set(events.Tags()["scalars"])
    metrics = _metrics(tmp_path, "full")
    lrs = [1e-4 + (2e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]  # the recipe's lr 2e-3
    assert [m["train/lr"] for m in metrics] == pytest.approx(lrs, rel=1e-9)
    # Step 0: the policy is the reference, so every implicit reward is 0 and the DPO term log 2
    # (up to fp32 summation order: the cache packed the pairs differently than the step).
    assert abs(metrics[0]["mpo/pref_loss"] - 0.6931472) < 1e-5 and abs(metrics[0]["mpo/reward_margin"]) < 1e-5
    assert metrics[0]["mpo/delta"] == 0.0 and abs(metrics[1]["mpo/delta"]) < 1e-5  # the mean of step 0's ~zeros
    assert metrics[-1]["mpo/reward_margin"] > 0 and metrics[-1]["mpo/gen_loss"] < metrics[0]["mpo/gen_loss"]
    assert metrics[-1]["mpo/delta"] != 0.0
    # Each step's data time: 4 pairs read, tiled and templated, a part of the step.
    assert all(0.0 < m["perf/data_time_s"] < m["perf/step_time_s"] for m in metrics)

    # Resume: 3 steps, then 3 more from the checkpoint == 6 in one go, bit for bit; the
    # resumed run reads the reference cache instead of recomputing with trained weights.
    _run(tmp_path, "split", 6, "--stop-after", "3")  # the schedule spans 6 steps in both runs
    resumed = _run(tmp_path, "split", 6, "--resume")
    assert "after step 3" in resumed.stdout and "pairs from" in resumed.stdout
    assert "reference log-probs: 4/" not in resumed.stdout  # no forward pass over the pairs
    split = _metrics(tmp_path, "split")
    drop = ("perf/",)  # timings differ; everything else, the gradient norm included, must not
    assert len(metrics) == len(split) == 6
    for a, b in zip(metrics, split):
        assert {k: v for k, v in a.items() if not k.startswith(drop)} == \
               {k: v for k, v in b.items() if not k.startswith(drop)}, a["step"]
    a = TorchDistReader(tmp_path / "full" / "step_000006" / "model")
    b = TorchDistReader(tmp_path / "split" / "step_000006" / "model")
    for key in a.keys():
        assert torch.equal(a.read(key), b.read(key)), key
    _resume_at_other_layouts(tmp_path, metrics)

    # Changed data invalidates the cache: the values are recomputed and the stale file removed.
    cache = tmp_path / "full" / "reference_logprobs"
    before = sorted(p.name for p in cache.glob("*.npz"))
    (tmp_path / "data2").mkdir()
    lines = (tmp_path / "data" / "preferences.jsonl").read_text().splitlines()
    (tmp_path / "data2" / "preferences.jsonl").write_text("\n".join(lines[:-1]).replace("images/", "../data/images/") + "\n")
    again = _run(tmp_path, "again", 1, "--set", f"mpo.reference_cache={cache}", data="data2")
    assert "stale" in again.stdout and "pairs from" not in again.stdout
    after = sorted(p.name for p in cache.glob("*.npz"))
    assert len(after) == 1 and after != before

    # A stage checkpoint exports to an HF checkpoint (in this process: tool_modules.run_tool; the
    # damaged export below runs the script as a real process, its exit status).
    export = run_tool("convert_checkpoint", "export", "--mcore-dir", str(tmp_path / "full" / "step_000006" / "model"),
                      "--out", str(tmp_path / "hf"))
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file()

    # Damage is named, never trained on or exported: one flipped byte in a model fragment
    # of the newest checkpoint (same size) stops --resume, export and the offline check,
    # each naming the file (checkpoint/manifest.py).
    shutil.copytree(tmp_path / "split", tmp_path / "damaged")
    fragment = sorted((tmp_path / "damaged" / "step_000006" / "model").glob("*.distcp"))[0]
    data = bytearray(fragment.read_bytes())
    data[len(data) // 2] ^= 0x01
    fragment.write_bytes(bytes(data))
    resume = _run(tmp_path, "damaged", 6, "--resume", expect_ok=False)
    assert resume.returncode == 1, resume.stdout[-2000:] + resume.stderr[-4000:]
    assert f"failed its integrity check: {fragment}: content differs from the manifest" in resume.stderr
    assert json.loads((tmp_path / "damaged" / "run_status.json").read_text())["state"] == "failed"
    export = subprocess.run([sys.executable, str(REPO / "tools/convert_checkpoint.py"), "export", "--mcore-dir",
                             str(fragment.parent), "--out", str(tmp_path / "hf_damaged")],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert export.returncode != 0 and f"{fragment.name}: content differs" in export.stderr, export.stderr[-3000:]
    assert not (tmp_path / "hf_damaged").exists()
    _each_kind_of_damage_is_named(tmp_path / "split" / "step_000006", tmp_path / "copies")
    # The intact one in this process (tool_modules.run_tool: main's return value is the exit status),
    # the damaged one as a real process (the script's exit status 1).
    for folder, ok in ((tmp_path / "split" / "step_000006", True), (tmp_path / "damaged" / "step_000006", False)):
        if ok:
            check = run_tool("verify_checkpoint", "--integrity", str(folder))
        else:
            check = subprocess.run([sys.executable, str(REPO / "tools/verify_checkpoint.py"), "--integrity",
                                    str(folder)], capture_output=True, text=True, env=ENV, timeout=300)
        report = json.loads(check.stdout)
        assert report["pass"] is ok and check.returncode == (0 if ok else 1), check.stdout + check.stderr[-2000:]
        assert ok or fragment.name in report["error"]


def _each_kind_of_damage_is_named(checkpoint, scratch):
    """Truncate, flip a byte in, or delete each kind of file of a real checkpoint: the
    integrity check names that file and the cause (checkpoint/manifest.py)."""
    from megatron_r1v.checkpoint.manifest import CheckpointIntegrityError, verify

    kinds = [next(checkpoint.glob("model/*.distcp")), checkpoint / "model" / ".metadata",
             checkpoint / "model" / "r1v_checkpoint.json", checkpoint / "rank_00001.pt", checkpoint / "trainer.json",
             sorted(checkpoint.glob("state/*.distcp"))[-1], checkpoint / "state" / "common.pt"]  # optimizer state

    def flip(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    damages = {"truncated": lambda p: p.write_bytes(p.read_bytes()[:-1]), "content differs": flip,
               "missing": lambda p: p.unlink()}
    for original in kinds:
        for cause, damage in damages.items():
            copy = scratch / f"{original.name}-{cause.split()[0]}"
            shutil.copytree(checkpoint, copy)
            damage(copy / original.relative_to(checkpoint))
            with pytest.raises(CheckpointIntegrityError, match=re.escape(f"{original.name}: {cause}")):
                verify(copy)
            shutil.rmtree(copy)
