"""Fault injection on a tiny 2-rank MPO run (the stage with the shortest steps; the save
path is the entry point's and the same for GRPO): a disk that fills during a save (a real
small tmpfs where a private mount is possible, and an ENOSPC hook on the rank that is not
rank 0), an image gone mid-run, a NaN gradient, kill -9 in the middle of a save. Damage to each kind of checkpoint file is in
tests/unit/test_manifest.py and tests/e2e/test_mpo_train.py, kill -9 mid-write in
tests/unit/test_atomic_dir.py, a reward server that stays down in tests/e2e/test_grpo_train.py,
a second trainer on one folder and a killed launcher in tests/e2e/test_graceful_stop.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tool_modules import run_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _train(tmp_path, *extra, fault=None, steps=3) -> subprocess.CompletedProcess:
    launch = [str(Path(__file__).parent / "fault_train.py")] if fault else ["-m", "megatron_r1v.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *launch,
           "--config", str(REPO / "examples/configs/tiny_mpo_cpu.yaml"),
           "--set", f"data.train_path={tmp_path / 'data' / 'preferences.jsonl'}",
           "--set", f"data.tokenizer={tmp_path / 'tok'}", "--set", f"train.steps={steps}",
           "--set", "mpo.pairs_per_step=4", "--set", "train.save_interval=1", "--set", "logging.tensorboard_dir=null",
           "--set", f"train.save_dir={tmp_path / 'run'}", "--metrics-jsonl", str(tmp_path / "metrics.jsonl"), *extra]
    env = dict(ENV, R1V_FAULT=fault, R1V_TEST_RUN=str(tmp_path)) if fault else dict(ENV, R1V_TEST_RUN=str(tmp_path))
    # Output to files, not pipes: after a kill -9, Megatron's checkpoint writer leaves its
    # multiprocessing Manager behind (an orphan holding the pipes open; on a cluster the
    # job's cgroup ends it), and reading pipes to EOF would wait for it.
    out, err = tmp_path / "train.out", tmp_path / "train.err"
    with open(out, "w") as out_file, open(err, "w") as err_file:
        proc = subprocess.run(cmd, stdout=out_file, stderr=err_file, env=env, cwd=tmp_path, timeout=900)
    _end_orphans(tmp_path)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())


def _end_orphans(tmp_path) -> None:
    """Kills what a killed run left behind: processes whose environment names this test's run."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.environ().get("R1V_TEST_RUN") == str(tmp_path):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def test_disk_full_during_a_save_is_named_and_loses_nothing(tmp_path):
    generate_dataset(tmp_path / "data", 16, seed=0)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "preferences.jsonl"], 640,
                    tmp_path / "tok")
    run = tmp_path / "run"
    # The disk fills inside Megatron's model save of the first checkpoint, on rank 1: torch's
    # CheckpointException is turned into one line naming the rank and the cause.
    first = _train(tmp_path, fault="enospc:1:#1", steps=1)
    assert first.returncode != 0 and (f"error: writing checkpoint {run / 'step_000001'} failed on rank 1: no space "
                                      "left on the device; " in first.stderr), first.stderr[-4000:]
    assert not (run / "latest").exists() and not [p for p in run.iterdir() if "step_" in p.name]
    assert json.loads((run / "run_status.json").read_text())["checkpoint"] is None
    assert not (tmp_path / "metrics.jsonl").exists()  # the step finished, its save did not: not logged

    # Rank 1's own optimizer file of the step-2 checkpoint hits ENOSPC (rank 0 writes on and
    # must not wait for it forever).
    proc = _train(tmp_path, fault="enospc:1:step_000002.partial/rank_00001.pt")
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert (f"error: writing checkpoint {run / 'step_000002'} failed on rank 1: no space left on the device; "
            in proc.stderr), proc.stderr[-4000:]
    assert "MiB free of" in proc.stderr and "(the previous checkpoints are intact)" in proc.stderr
    # Nothing half-written, nothing lost: step 1 is complete, verified and named by latest.
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".step", "step"))) == ["step_000001"]
    assert (run / "latest").read_text().strip() == "step_000001"
    check = run_tool("verify_checkpoint", "--integrity", str(run / "step_000001"))  # in this process
    assert json.loads(check.stdout)["pass"], check.stdout
    status = json.loads((run / "run_status.json").read_text())
    assert status["state"] == "failed" and "no space left" in status["error"]
    assert status["completed_steps"] == 2 and status["checkpoint"] == "step_000001"
    assert not (run / ".lock").exists()
    # With space again, --resume continues from step 1.
    resumed = _train(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "after step 1" in resumed.stdout and (run / "latest").read_text().strip() == "step_000003"
    # Step index 1 finished but its save failed, so it was not logged; the resumed run redid it.
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_image_gone_mid_run_stops_with_a_checkpoint_and_resumes(tmp_path):
    """data.on_bad_sample=error and the images disappear during training: the step fails on
    the ranks that read them, every rank stops, the state after the last finished step is
    saved (no interval checkpoint exists: save_interval 0), and --resume continues."""
    import time

    generate_dataset(tmp_path / "data", 16, seed=0)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "preferences.jsonl"], 640,
                    tmp_path / "tok")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "megatron_r1v.train", "--config", str(REPO / "examples/configs/tiny_mpo_cpu.yaml"),
           "--set", f"data.train_path={tmp_path / 'data' / 'preferences.jsonl'}",
           "--set", f"data.tokenizer={tmp_path / 'tok'}", "--set", "train.steps=400", "--set", "mpo.pairs_per_step=4",
           "--set", "train.save_interval=0", "--set", "logging.tensorboard_dir=null",
           "--set", f"mpo.reference_cache={tmp_path / 'cache'}",
           "--set", f"train.save_dir={tmp_path / 'run'}", "--metrics-jsonl", str(tmp_path / "metrics.jsonl")]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 600
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-4000:]
        time.sleep(0.2)
    (tmp_path / "data" / "images").rename(tmp_path / "images_away")
    out, err = job.communicate(timeout=600)
    status = json.loads((tmp_path / "run" / "run_status.json").read_text())
    done = status["completed_steps"]
    assert job.returncode != 0 and status["state"] == "failed" and done >= 2, out[-2000:] + err[-4000:]
    assert "ImageError" in status["error"] and f"error: step {done + 1}/400 failed: rank " in err
    assert status["checkpoint"] == f"step_{done:06d}" and (tmp_path / "run" / f"step_{done:06d}").is_dir()
    (tmp_path / "images_away").rename(tmp_path / "data" / "images")
    resumed = subprocess.run([*cmd, "--resume", "--stop-after", "1"], capture_output=True, text=True, env=ENV,
                             cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0 and f"after step {done}" in resumed.stdout, resumed.stderr[-4000:]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(done + 1))


def test_non_finite_gradients_stop_before_the_update_and_resume_identically(tmp_path):
    """A NaN gradient on rank 1 in step 2: every rank refuses the update (weights and
    optimizer state untouched), the stop checkpoint holds the state after step 1, and
    --resume gives the uninterrupted run's metrics bit for bit."""
    generate_dataset(tmp_path / "data", 16, seed=0)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "preferences.jsonl"], 640,
                    tmp_path / "tok")
    cache = ["--set", f"mpo.reference_cache={tmp_path / 'cache'}", "--set", "train.save_interval=0"]
    full = _train(tmp_path, *cache, "--set", f"train.save_dir={tmp_path / 'full'}",
                  "--metrics-jsonl", str(tmp_path / "full.jsonl"))
    assert full.returncode == 0, full.stderr[-4000:]
    failed = _train(tmp_path, *cache, fault="nan:1:2")
    run = tmp_path / "run"
    status = json.loads((run / "run_status.json").read_text())
    assert failed.returncode != 0 and status["state"] == "failed", failed.stderr[-4000:]
    assert status["completed_steps"] == 1 and status["checkpoint"] == "step_000001"
    assert "FloatingPointError: step 1: non-finite gradients; the optimizer step was not taken" in status["error"]
    assert "error: step 2/3 failed: FloatingPointError" in failed.stderr
    resumed = _train(tmp_path, *cache, "--resume")
    assert resumed.returncode == 0 and "after step 1" in resumed.stdout, resumed.stderr[-4000:]

    def metrics(path):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
                for line in path.read_text().splitlines()]

    assert metrics(tmp_path / "metrics.jsonl") == metrics(tmp_path / "full.jsonl")


def test_kill_9_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    """Rank 0 is SIGKILLed while writing its optimizer file of the step-2 checkpoint (the
    model fragments of step 2 are already on disk): latest still names step 1, which
    verifies, and --resume continues from it; its next save of step 2 replaces the leftover."""
    generate_dataset(tmp_path / "data", 16, seed=0)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "preferences.jsonl"], 640,
                    tmp_path / "tok")
    killed = _train(tmp_path, fault="kill:0:step_000002.partial/rank_00000.pt")
    run = tmp_path / "run"
    assert killed.returncode != 0
    assert (run / "latest").read_text().strip() == "step_000001" and not (run / "step_000002").exists()
    assert (run / ".step_000002.partial" / "model").is_dir()  # the half-written one, never named by latest
    check = run_tool("verify_checkpoint", "--integrity", str(run / "step_000001"))  # in this process
    assert json.loads(check.stdout)["pass"], check.stdout
    # The killed rank 0 held the folder's lock: on this host its dead pid marks it stale.
    resumed = _train(tmp_path, "--resume")
    assert resumed.returncode == 0 and "after step 1" in resumed.stdout, resumed.stderr[-4000:]
    assert "which is no longer running: taking it over" in resumed.stderr
    assert (run / "latest").read_text().strip() == "step_000003" and not (run / ".step_000002.partial").exists()


def _private_tmpfs_works() -> bool:
    """Whether this machine lets an unprivileged-looking test mount a small tmpfs in a mount
    namespace of its own (root, or user namespaces enabled)."""
    import shutil

    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


@pytest.mark.skipif(not _private_tmpfs_works(), reason="no private tmpfs mount here (needs root or user "
                    "namespaces); test_disk_full_during_a_save_is_named_and_loses_nothing covers it with a hook")
def test_a_really_full_disk_during_a_save(tmp_path):
    """The save folder on a 6 MiB tmpfs: the step-1 checkpoint (~3.8 MiB) fits, the step-2
    one does not. Inside one private mount namespace: train, inspect, grow the mount, resume."""
    generate_dataset(tmp_path / "data", 16, seed=0)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "preferences.jsonl"], 640,
                    tmp_path / "tok")
    disk, run = tmp_path / "disk", tmp_path / "disk" / "run"
    disk.mkdir()
    train = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "megatron_r1v.train",
             "--config", str(REPO / "examples/configs/tiny_mpo_cpu.yaml"),
             "--set", f"data.train_path={tmp_path / 'data' / 'preferences.jsonl'}",
             "--set", f"data.tokenizer={tmp_path / 'tok'}", "--set", "train.steps=3", "--set", "mpo.pairs_per_step=4",
             "--set", "train.save_interval=1", "--set", "logging.tensorboard_dir=null",
             "--set", f"mpo.reference_cache={tmp_path / 'cache'}", "--set", f"train.save_dir={run}"]
    py, quoted = sys.executable, " ".join(f"'{a}'" for a in train)
    script = f"""
        mount -t tmpfs -o size=6m tmpfs '{disk}' || exit 90
        '{py}' {quoted} > '{tmp_path}/first.out' 2> '{tmp_path}/first.err'; echo $? > '{tmp_path}/first.rc'
        ls -a '{run}' > '{tmp_path}/listing'
        '{py}' '{REPO}/tools/verify_checkpoint.py' --integrity '{run}/step_000001' > '{tmp_path}/verify.json'
        cp '{run}/run_status.json' '{tmp_path}/status.json'
        mount -o remount,size=64m '{disk}'
        '{py}' {quoted} --resume > '{tmp_path}/second.out' 2> '{tmp_path}/second.err'; echo $? > '{tmp_path}/second.rc'
        cat '{run}/latest' > '{tmp_path}/latest'
    """
    env = dict(ENV, R1V_TEST_RUN=str(tmp_path))
    proc = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=1200)
    _end_orphans(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() != "0"
    assert f"error: writing checkpoint {run / 'step_000002'} failed on rank" in err, err[-4000:]
    assert "no space left on the device" in err and "MiB free of" in err
    listing = (tmp_path / "listing").read_text().split()
    assert "step_000001" in listing and "step_000002" not in listing and ".step_000002.partial" not in listing
    assert json.loads((tmp_path / "verify.json").read_text())["pass"]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["checkpoint"] == "step_000001"
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()[-4000:]
    assert "after step 1" in (tmp_path / "second.out").read_text()
    assert (tmp_path / "latest").read_text().strip() == "step_000003"
