"""One writer per run folder (``train.save_dir``), and what a fresh run may find there.

- :class:`RunFolderLock`: ``<save_dir>/.lock`` (host, pid, start time, command), created
  exclusively by rank 0 before the model is built and removed at exit. A second trainer on
  the same folder stops with a message naming the holder. A lock left by a process that is
  gone (same host, pid no longer running) is stale and taken over with a warning; on
  another host liveness cannot be checked, so the message says which file to remove.
- :func:`prepare_save_dir`: a run without ``--resume`` refuses a folder that holds
  checkpoints (continuing one lineage and starting another in one folder would interleave
  their steps and move ``latest`` backwards); with ``--force`` the old run's checkpoints,
  ``latest`` and ``run_status.json`` move into ``replaced-<UTC time>/`` first. The
  reference-log-prob cache stays: its file names are keyed by what it was computed from.
- :func:`rotate_checkpoints`: ``train.keep_last``, deleting old complete checkpoints only
  after a newer one is committed and named by ``latest``.
- :func:`exit_with_launcher`: workers started by torchrun get SIGTERM (a graceful stop)
  when their launcher dies, instead of training on as orphans beside the next job.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = ".lock"
LATEST = "latest"
RUN_STATUS = "run_status.json"
STEP_PATTERN = re.compile(r"^step_(\d+)$")
PARTIAL_PATTERN = re.compile(r"^\.step_\d+\.partial$")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (busy, or holds another run's checkpoints)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunFolderLock:
    """``with RunFolderLock(save_dir): ...`` holds ``<save_dir>/.lock`` (module docstring)."""

    def __init__(self, save_dir: str | os.PathLike) -> None:
        self.path = Path(save_dir) / LOCK_NAME
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": sys.argv}

    def __enter__(self) -> "RunFolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self.record, handle)
            return self
        raise RunFolderError(f"could not take {self.path}: another trainer took it at the same moment")

    def _clear_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        host, pid = holder.get("host"), holder.get("pid")
        if host == self.record["host"] and isinstance(pid, int) and not _pid_alive(pid):
            print(f"warning: {self.path} was left by pid {pid} on {host}, which is no longer running: taking it over",
                  file=sys.stderr, flush=True)
            self.path.unlink(missing_ok=True)
            return
        where = (f"pid {pid} on {host}, started {holder.get('started')}" if holder
                 else "an unreadable lock record")
        hint = (f"if that process is gone (it ran on another host, whose processes cannot be checked from here), "
                f"remove {self.path}" if host != self.record["host"] else "wait for it, or stop it")
        raise RunFolderError(f"{self.path.parent} is in use by another trainer ({where}); {hint}")

    def __exit__(self, *exc) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            self.path.unlink(missing_ok=True)


def checkpoint_steps(save_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete-looking ``step_N`` folders in ``save_dir``, ascending."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := STEP_PATTERN.match(p.name)) and p.is_dir())


def prepare_save_dir(save_dir: str | os.PathLike, *, resume: bool, force: bool, move: bool) -> Optional[Path]:
    """Checks that a fresh run may write ``save_dir`` (module docstring); with ``force`` and
    ``move`` (rank 0 only) moves the old run aside and returns where it went."""
    folder = Path(save_dir)
    steps = checkpoint_steps(folder)
    if resume or not (steps or (folder / LATEST).exists()):
        return None
    if not force:
        raise RunFolderError(
            f"train.save_dir={folder} already holds checkpoints (steps {steps[0] if steps else '?'}.."
            f"{steps[-1] if steps else '?'}): continue that run with --resume, or start over with --force "
            f"(moves them into {folder}/replaced-<time>/)")
    if not move:
        return None
    aside = folder / time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir()
    for entry in sorted(folder.iterdir()):
        if STEP_PATTERN.match(entry.name) or PARTIAL_PATTERN.match(entry.name) or entry.name in (LATEST, RUN_STATUS):
            entry.rename(aside / entry.name)
    print(f"--force: the previous run's checkpoints moved to {aside}", flush=True)
    return aside


def rotate_checkpoints(save_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Deletes all but the ``keep_last`` newest ``step_N`` folders (never the one ``latest``
    names); returns what was deleted. ``keep_last`` 0 keeps everything."""
    folder = Path(save_dir)
    if keep_last < 1:
        return []
    latest = (folder / LATEST).read_text().strip() if (folder / LATEST).is_file() else None
    removed = []
    for step in checkpoint_steps(folder)[:-keep_last]:
        path = folder / f"step_{step:06d}"
        if path.name != latest:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def exit_with_launcher() -> None:
    """Under torchrun (Linux), asks the kernel to send this worker SIGTERM when its parent
    (the torchrun agent) dies; the graceful-stop handler then ends the run after the step.
    torchrun starts workers in their own sessions, so a ``kill -9`` of the agent's process
    group would otherwise leave them training, and writing checkpoints, as orphans."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        print(f"warning: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}): this worker will not stop "
              "by itself if its launcher dies", file=sys.stderr, flush=True)
        return
    if parent == 1 or not _pid_alive(parent):  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
