"""Imports a script of tools/ (not a package) as a module, for tests that call its functions
(``run_tool``: its command line, in this process)."""

import contextlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    """tools/``name``.py as a fresh module named ``name`` (executed anew on every call)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_sampling_tool(tool: ModuleType, setup: dict, out, *extra: str, prompts=None, progress=None) -> int:
    """``tool.main`` (tools/rejection_sample.py or tools/generate_preferences.py) on ``setup``'s
    tiny model and prompts with small, fast sampling settings; ``extra`` flags come last."""
    argv = ["--model", str(setup["model"]), "--prompts", str(prompts or setup["data"]), "--out", str(out),
            "--max-new-tokens", "8", "--batch-size", "2", "--max-tiles", "6", "--tiler", "pil", "--tiler-threads", "1",
            *extra]
    return tool.main(argv, progress=progress if progress is not None else (lambda line: None))


def run_tool(name: str, *argv: str, cwd=None) -> subprocess.CompletedProcess:
    """``python tools/name.py ARGV`` in this process: ``main(argv)`` of a fresh load of the tool,
    with sys.stdout / sys.stderr captured; returns what ``subprocess.run(..., capture_output=True,
    text=True)`` would (returncode: main's return value, or the code of a SystemExit it raised,
    as ``sys.exit(main())`` gives). Saves the interpreter start-up and imports of a subprocess
    for tests that are about what the tool does; each test that uses it still runs the tool as
    a real process at least once where its exit status matters. ``cwd``: the working directory
    while it runs (default: this process's)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or "."), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = load_tool(name).main(list(argv))
        except SystemExit as stop:  # argparse errors
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if stop.code is not None and not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)
    return subprocess.CompletedProcess([name, *argv], code or 0, out.getvalue(), err.getvalue())
