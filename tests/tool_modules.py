"""Imports a script of tools/ (not a package) as a module, for tests that call its functions."""

import importlib.util
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
