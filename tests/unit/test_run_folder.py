"""trainer/run_folder.py: the run folder's lock, what a fresh run may find there, checkpoint
rotation, and workers that stop when their launcher dies; trainer/stop.py's status file."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_r1v.trainer.run_folder import (
    LOCK_NAME,
    RunFolderError,
    RunFolderLock,
    checkpoint_steps,
    prepare_save_dir,
    rotate_checkpoints,
)
from megatron_r1v.trainer.stop import write_run_status


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _checkpoints(folder, steps, latest):
    for step in steps:
        (folder / f"step_{step:06d}").mkdir(parents=True)
        (folder / f"step_{step:06d}" / "trainer.json").write_text(json.dumps({"step": step}))
    (folder / "latest").write_text(f"step_{latest:06d}\n")


def test_lock_is_exclusive_and_released(tmp_path):
    with RunFolderLock(tmp_path / "run"):
        record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"]
        # This process is alive on this host: a second trainer must not take the folder.
        with pytest.raises(RunFolderError, match=rf"in use by another trainer \(pid {os.getpid()} on "):
            with RunFolderLock(tmp_path / "run"):
                pass
        assert (tmp_path / "run" / LOCK_NAME).exists()  # the refused one did not remove the holder's lock
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_stale_lock_on_this_host_is_taken_over(tmp_path, capsys):
    pid = _dead_pid()
    with RunFolderLock(tmp_path):
        host = json.loads((tmp_path / LOCK_NAME).read_text())["host"]
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "started": "then"}))
    with RunFolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"left by pid {pid}" in capsys.readouterr().err


def test_lock_of_another_host_names_the_file_to_remove(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-that-is-not-here", "pid": 1, "started": "t"}))
    with pytest.raises(RunFolderError, match=r"node-that-is-not-here.*remove .*\.lock"):
        with RunFolderLock(tmp_path):
            pass
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "node-that-is-not-here"


def test_fresh_run_refuses_a_used_folder_and_force_moves_it_aside(tmp_path):
    run = tmp_path / "run"
    assert prepare_save_dir(run, resume=False, force=False, move=True) is None  # no folder yet
    _checkpoints(run, [2, 4], latest=4)
    (run / "run_status.json").write_text("{}")
    (run / ".step_000006.partial").mkdir()
    (run / "reference_logprobs").mkdir()
    with pytest.raises(RunFolderError, match=r"holds checkpoints \(steps 2\.\.4\).*--resume.*--force"):
        prepare_save_dir(run, resume=False, force=False, move=True)
    assert prepare_save_dir(run, resume=True, force=False, move=True) is None
    assert prepare_save_dir(run, resume=False, force=True, move=False) is None  # other ranks: check only
    assert checkpoint_steps(run) == [2, 4]
    aside = prepare_save_dir(run, resume=False, force=True, move=True)
    assert sorted(p.name for p in aside.iterdir()) == [".step_000006.partial", "latest", "run_status.json",
                                                       "step_000002", "step_000004"]
    assert sorted(p.name for p in run.iterdir()) == ["reference_logprobs", aside.name]  # keyed cache stays
    assert prepare_save_dir(run, resume=False, force=False, move=True) is None  # now a fresh folder


def test_rotation_keeps_the_newest_and_the_one_latest_names(tmp_path):
    _checkpoints(tmp_path, [1, 2, 3, 4, 5], latest=5)
    assert rotate_checkpoints(tmp_path, 0) == []
    assert [p.name for p in rotate_checkpoints(tmp_path, 2)] == ["step_000001", "step_000002", "step_000003"]
    assert checkpoint_steps(tmp_path) == [4, 5]
    (tmp_path / "latest").write_text("step_000004\n")  # never delete what latest names
    (tmp_path / "step_000006").mkdir()
    assert rotate_checkpoints(tmp_path, 1) == [tmp_path / "step_000005"]
    assert checkpoint_steps(tmp_path) == [4, 6]


def test_run_status_records_state_error_and_checkpoint(tmp_path):
    write_run_status(tmp_path, 3, 10, None, state="failed", error="RewardServerError: down", checkpoint="step_000003")
    assert json.loads((tmp_path / "run_status.json").read_text()) == {
        "completed_steps": 3, "total_steps": 10, "finished": False, "signal": None, "state": "failed",
        "error": "RewardServerError: down", "checkpoint": "step_000003"}
    with pytest.raises(ValueError, match="run state must be one of"):
        write_run_status(tmp_path, 3, 10, None, state="crashed")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_worker_gets_sigterm_when_its_launcher_dies(tmp_path):
    worker = textwrap.dedent(f"""
        import os, pathlib, signal, sys, time
        from megatron_r1v.trainer.run_folder import exit_with_launcher
        marker = pathlib.Path({str(tmp_path)!r})
        signal.signal(signal.SIGTERM, lambda *a: (marker.joinpath("got_sigterm").write_text("1"), sys.exit(0)))
        exit_with_launcher()
        marker.joinpath("worker_ready").write_text(str(os.getpid()))
        time.sleep(120)
    """)
    launcher = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = dict(os.environ, TORCHELASTIC_RUN_ID="test")
        subprocess.Popen([sys.executable, "-c", {worker!r}], env=env, start_new_session=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    deadline = time.monotonic() + 60
    while not (tmp_path / "worker_ready").exists():
        assert time.monotonic() < deadline and parent.poll() is None, "the worker never started"
        time.sleep(0.1)
    worker_pid = int((tmp_path / "worker_ready").read_text())
    os.kill(parent.pid, signal.SIGKILL)  # like kill -9 of torchrun: the worker is in its own session
    parent.wait()
    while not (tmp_path / "got_sigterm").exists():
        if time.monotonic() > deadline:
            os.kill(worker_pid, signal.SIGKILL)
            raise AssertionError("the orphaned worker was not told to stop")
        time.sleep(0.1)
