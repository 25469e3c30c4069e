"""megatron_r1v.atomic_dir: outputs appear complete or not at all, also when the writer is killed."""

import os
import subprocess
import sys
import textwrap

import pytest

from megatron_r1v.atomic_dir import (
    atomic_directory,
    atomic_file,
    commit_directory,
    partial_directory,
    partial_path,
    write_text_atomic,
)


def killed_mid_write(code: str) -> None:
    """Runs ``code`` in a fresh interpreter that SIGKILLs itself where the code says ``die()``."""
    program = "import os, signal\ndef die():\n    os.kill(os.getpid(), signal.SIGKILL)\n" + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])  # it died where it was told to


def test_a_writer_killed_mid_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "result.json"
    write_text_atomic(target, '{"accuracy": 0.5}\n')
    killed_mid_write(f"""
        from megatron_r1v.atomic_dir import atomic_file
        with atomic_file({str(target)!r}) as handle:
            handle.write('{{"accuracy": 0.9, "half')
            handle.flush()
            die()
    """)
    assert target.read_text() == '{"accuracy": 0.5}\n'
    # The killed writer's hidden temporary is all that is left; the next write succeeds.
    assert [p.name.startswith(".result.json.partial-") for p in tmp_path.iterdir() if p != target] == [True]
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"


def test_a_writer_killed_mid_write_leaves_the_previous_folder(tmp_path):
    out = tmp_path / "data"
    with atomic_directory(out) as tmp:
        (tmp / "prompts.jsonl").write_text("old\n")
    killed_mid_write(f"""
        from pathlib import Path
        from megatron_r1v.atomic_dir import atomic_directory
        with atomic_directory(Path({str(out)!r})) as tmp:
            (tmp / "prompts.jsonl").write_text("new, half")
            die()
    """)
    assert sorted(p.name for p in out.iterdir()) == ["prompts.jsonl"] and (out / "prompts.jsonl").read_text() == "old\n"


def test_an_exception_removes_the_temporary_and_keeps_the_file(tmp_path):
    target = tmp_path / "sub" / "curves.png"
    with atomic_file(target, "wb") as handle:
        handle.write(b"\x89PNG old")
    with pytest.raises(RuntimeError, match="plot failed"):
        with atomic_file(target, "wb") as handle:
            handle.write(b"\x89PNG new, half")
            raise RuntimeError("plot failed")
    assert target.read_bytes() == b"\x89PNG old"
    assert [p.name for p in target.parent.iterdir()] == ["curves.png"]
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_file(target, "a"):
            pass


def test_multi_rank_folder_commit_replaces_only_when_complete(tmp_path):
    out = tmp_path / "step_000003"
    out.mkdir()
    (out / "trainer.json").write_text("old")
    stale = partial_path(out)
    stale.mkdir()
    (stale / "rank_00000.pt").write_text("left by a killed save")
    partial = partial_directory(out)
    assert partial == stale and list(partial.iterdir()) == []  # the stale content is gone
    (partial / "trainer.json").write_text("new")
    assert (out / "trainer.json").read_text() == "old"  # nothing visible before the commit
    commit_directory(partial, out)
    assert (out / "trainer.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003"]  # no backup or partial left


def test_outputs_get_the_umask_mode_not_the_temporary_one(tmp_path):
    """mkstemp / mkdtemp make 0600 / 0700 temporaries; the committed output must carry the mode a
    plain open / mkdir gives (0666 / 0777 minus the umask), or checkpoints on a shared
    filesystem would be private to their writer."""
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o750
