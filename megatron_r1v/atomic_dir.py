"""Output folders that appear complete or not at all.

Everything that writes a folder (conversion, synthetic data, tokenizers, prompt pools)
writes into a hidden temporary folder beside the target and moves it into place at the
end; a replaced output is deleted only after the new one is in place, so a failure at
any point leaves either the old output or the new one, never a mix.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, out)
