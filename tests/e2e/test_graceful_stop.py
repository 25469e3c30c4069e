"""End to end: SIGUSR1 / SIGTERM stop a running 2-rank CPU job after the current step, with
a checkpoint and exit status 0, and --resume continues from it (trainer/stop.py); the run
folder has one writer, and workers stop when their launcher is killed (trainer/run_folder.py).

The tiny MPO recipe is used because its steps are short; the stop logic is the entry
point's and the same for both stages.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
STEPS = 400  # far more than a test waits for (also on a busy machine): the run must end by the signal


def _command(tmp_path, *extra) -> list[str]:
    """The training command of one process (rank 0 without torchrun)."""
    return [sys.executable, "-m", "megatron_r1v.train", *_arguments(tmp_path, *extra)]


def _start(tmp_path, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "megatron_r1v.train", *_arguments(tmp_path, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)


def _arguments(tmp_path, *extra) -> list[str]:
    return ["--config", str(REPO / "examples/configs/tiny_mpo_cpu.yaml"),
            "--set", f"data.train_path={tmp_path / 'data' / 'preferences.jsonl'}",
            "--set", f"data.tokenizer={tmp_path / 'tok'}", "--set", f"train.steps={STEPS}",
            "--set", "mpo.pairs_per_step=4", "--set", "train.save_interval=0", "--set", "logging.tensorboard_dir=null",
            "--set", f"train.save_dir={tmp_path / 'run'}", "--metrics-jsonl", str(tmp_path / "metrics.jsonl"), *extra]


def _steps_logged(tmp_path) -> list[int]:
    path = tmp_path / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_steps(tmp_path, proc, count: int, timeout: float = 600) -> None:
    """Polls the metrics file (written by rank 0 after each step) until ``count`` more steps appear."""
    target = len(_steps_logged(tmp_path)) + count
    deadline = time.monotonic() + timeout
    while len(_steps_logged(tmp_path)) < target:
        assert proc.poll() is None, f"job ended early: {proc.communicate()[1][-4000:]}"
        assert time.monotonic() < deadline, "job made no progress"
        time.sleep(0.5)


def _worker(agent: subprocess.Popen, local_rank: int) -> psutil.Process:
    for child in psutil.Process(agent.pid).children(recursive=True):
        if "megatron_r1v.train" in " ".join(child.cmdline()) and child.environ().get("LOCAL_RANK") == str(local_rank):
            return child
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under torchrun pid {agent.pid}")


def _status(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "run_status.json").read_text())


def test_signal_stops_with_checkpoint_and_resumes(tmp_path):
    generate_dataset(tmp_path / "data", 16, seed=0)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "preferences.jsonl"], 640,
                    tmp_path / "tok")

    # SIGUSR1 to rank 1 only: rank 0 never sees it, yet both must stop after the same step.
    job = _start(tmp_path)
    _wait_for_steps(tmp_path, job, 2)
    assert json.loads((tmp_path / "run" / "run_status.json").read_text())["state"] == "running"
    # A second trainer on the same folder is refused by the first one's lock, before any work.
    second = subprocess.run(_command(tmp_path), capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert second.returncode == 2 and "is in use by another trainer" in second.stderr, second.stderr[-3000:]
    _worker(job, 1).send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, out[-3000:] + err[-4000:]
    status = _status(tmp_path)
    first_stop = status["completed_steps"]
    assert status == {"completed_steps": first_stop, "total_steps": STEPS, "finished": False, "signal": "SIGUSR1",
                      "state": "stopped", "error": None, "checkpoint": f"step_{first_stop:06d}"}
    assert 2 <= first_stop < STEPS
    assert "[rank 1] received SIGUSR1" in err and "[rank 0] received" not in err
    assert f"stopped by SIGUSR1 after step {first_stop}/{STEPS}" in out
    # The checkpoint of the last finished step is there and is the newest.
    assert (tmp_path / "run" / "latest").read_text().strip() == f"step_{first_stop:06d}"
    assert _steps_logged(tmp_path) == list(range(first_stop))

    # A fresh run (no --resume) into the folder that now holds checkpoints is refused.
    fresh = subprocess.run(_command(tmp_path), capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert fresh.returncode == 2 and "already holds checkpoints" in fresh.stderr, fresh.stderr[-3000:]

    # Resume, then SIGTERM to the torchrun agent, which forwards it to both workers.
    job = _start(tmp_path, "--resume")
    _wait_for_steps(tmp_path, job, 1)
    os.kill(job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=600)
    assert f"after step {first_stop}" in out  # resumed where the first run stopped
    status = _status(tmp_path)
    second_stop = status["completed_steps"]
    assert status["signal"] == "SIGTERM" and not status["finished"] and first_stop < second_stop < STEPS
    assert "[rank 0] received SIGTERM" in err and "[rank 1] received SIGTERM" in err
    assert (tmp_path / "run" / "latest").read_text().strip() == f"step_{second_stop:06d}"
    # Every step ran exactly once over the two runs, in order.
    assert _steps_logged(tmp_path) == list(range(second_stop))

    # Resume, then kill -9 the torchrun agent: its workers (in their own sessions) get
    # SIGTERM from the kernel (run_folder.exit_with_launcher), stop after the step with a
    # checkpoint, release the lock and exit instead of training on as orphans.
    job = _start(tmp_path, "--resume")
    _wait_for_steps(tmp_path, job, 1)
    workers = [_worker(job, 0), _worker(job, 1)]
    os.kill(job.pid, signal.SIGKILL)
    out, err = job.communicate(timeout=600)  # the pipes close when the last worker exits
    psutil.wait_procs(workers, timeout=60)
    assert not any(w.is_running() for w in workers), "orphaned workers kept running"
    status = _status(tmp_path)
    third_stop = status["completed_steps"]
    assert status["signal"] == "SIGTERM" and status["state"] == "stopped" and second_stop < third_stop < STEPS, err
    assert (tmp_path / "run" / "latest").read_text().strip() == f"step_{third_stop:06d}"
    assert not (tmp_path / "run" / ".lock").exists()
    assert _steps_logged(tmp_path) == list(range(third_stop))


def test_signal_during_the_build_says_no_checkpoint_was_written(tmp_path):
    # 300 records: the build computes reference log-probs of ~100 pairs, seconds of work
    # inside which the signal lands.
    generate_dataset(tmp_path / "data", 300, seed=0)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "preferences.jsonl"], 640,
                    tmp_path / "tok")
    job = _start(tmp_path)
    status_file, deadline = tmp_path / "run" / "run_status.json", time.monotonic() + 300
    # "running" is written after the stop handlers are in and before the model build.
    while not status_file.exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-4000:]
        time.sleep(0.05)
    time.sleep(0.5)  # rank 1 installs its handlers at about the same moment
    os.kill(job.pid, signal.SIGTERM)  # torchrun forwards it, then exits non-zero as it does after any signal
    out, err = job.communicate(timeout=600)
    assert "stopped by SIGTERM after step 0/400: no checkpoint written (no step had finished)" in out
    status = _status(tmp_path)
    assert (status["state"], status["completed_steps"], status["checkpoint"], status["signal"]) == \
        ("stopped", 0, None, "SIGTERM")
    assert not (tmp_path / "run" / "latest").exists() and _steps_logged(tmp_path) == []
