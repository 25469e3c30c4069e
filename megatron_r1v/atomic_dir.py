"""Output files and folders that appear complete or not at all.

Every file or folder the library writes goes through here: the content is written under
a hidden temporary name beside the target and moved into place at the end (``os.replace``
for a file, two renames for a folder); a replaced folder is deleted only after the new
one is in place. A failure or a kill at any point therefore leaves either the previous
output or the new one, never a mix or a half-written file; at most a hidden temporary is
left behind, which the next writer of that target removes or ignores.

- :func:`atomic_file` / :func:`write_text_atomic`: one file (results, status, caches, plots);
- :func:`atomic_directory`: a folder written by one process;
- :func:`partial_path` / :func:`partial_directory` + :func:`commit_directory`: a folder
  written by several ranks into a temporary name they all know, committed by one of them;
- :func:`check_writable`: an output's folder can take files, checked before the work
  whose result would go there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be
    read by setting it, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _plain_mode(path: str | os.PathLike, base: int) -> None:
    """Gives a temporary from mkstemp (0600) / mkdtemp (0700) the mode an ordinary
    ``open`` / ``mkdir`` would have (``base`` minus the umask), so outputs on a shared
    filesystem stay readable by the group as usual."""
    os.chmod(path, base & ~_umask())


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Yields ``path``'s new content as a file open on a hidden temporary beside it.

    On success the file is flushed to disk and moved over ``path``; on any exception it
    is removed and ``path`` keeps its previous content. ``mode`` is ``"w"`` (text) or
    ``"wb"`` (bytes; ``encoding`` is ignored)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes with mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        _plain_mode(tmp, 0o666)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` through :func:`atomic_file`; returns the path."""
    with atomic_file(path) as handle:
        handle.write(text)
    return Path(path)


def commit_directory(tmp: Path, out: Path) -> None:
    """Puts ``tmp`` at ``out``; a replaced output is deleted only once the new one is in place."""
    backup = None
    if out.exists():
        backup = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        out.rename(backup)
    try:
        tmp.rename(out)
    except OSError:
        if backup is not None:
            backup.rename(out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``out``; moved to ``out`` on success,
    removed on any exception."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _plain_mode(tmp, 0o777)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, out)


def partial_path(out: Path) -> Path:
    """``.<name>.partial`` beside ``out``: the temporary name every rank of a multi-rank
    writer derives the same way."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def partial_directory(out: Path) -> Path:
    """Creates :func:`partial_path` of ``out`` fresh and empty (removing one a killed writer left).

    For folders several ranks write: one rank calls this, all write into
    ``partial_path(out)`` after a barrier, and that rank moves it into place with
    :func:`commit_directory` after a second barrier.
    """
    partial = partial_path(out)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raises ValueError naming ``what`` when ``path`` cannot be written: its folder cannot
    be created or takes no new file (read-only file system, permissions, a full disk)."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=f".{Path(path).name}.probe-", dir=parent) as probe:
            probe.write(b"x")
            probe.flush()
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot write there ({err.strerror or err})") from None
