"""Fused vocab-parallel log-prob and clipped-ratio GRPO loss, installed as ``megatron_r1v.kernels``.

Public API (a contract the trainer and users call):

- :func:`vocab_parallel_logprobs` ``(logits, labels, *, tp_group, temperature,
  return_entropy, backend, inplace) -> (logprobs [T], entropy [T] or None)``
- :func:`grpo_loss` ``(logits, labels, old_logprobs, ref_logprobs, advantages, loss_mask,
  *, clip_low, clip_high, kl_beta, temperature, tp_group, backend, inplace)
  -> (loss_per_token [T], GRPOStats)``

``logits`` is this rank's vocabulary slice ``[T, V/tp]``; nothing materializes an fp32
``[T, V]`` buffer. Backends (``dispatch``): ``triton`` on CUDA, ``interpret`` (the same
Triton kernels under ``TRITON_INTERPRET=1`` on CPU) and ``torch`` (chunked, CPU default).

The top-level name ``kernels`` belongs to Hugging Face's package (transformers imports it,
setuptools loads its plug-in in every build). Python puts the working directory or a
script's folder first on ``sys.path``, so from the repository root this folder is found
under that name before site-packages. Imported as ``kernels``, this file therefore runs
only :func:`_hand_over_top_level_name` and none of the modules below: ``import kernels``
always gives Hugging Face's package, or fails as if this folder were absent, whatever the
working directory and whether or not ``PYTHONSAFEPATH`` is set (tests/unit/test_package.py).
One limit: ``importlib.util.find_spec("kernels")`` names this folder until the first
import (a spec is only a location; importing it gives Hugging Face's package).
"""

from __future__ import annotations

# Found in a copy's __init__.py, it marks that copy as this package, not Hugging Face's.
_TOP_LEVEL_MARKER = "megatron-r1v kernels/: hands the top-level name to Hugging Face's kernels"


def _hand_over_top_level_name(namespace: dict) -> None:
    """Turn this module object, imported as ``kernels``, into Hugging Face's package.

    Finds the ``kernels`` that ``sys.path`` and the meta-path finders hold besides any copy
    of this folder, clears ``namespace`` (this module's globals), gives it that package's
    spec, file and path, and runs the package's ``__init__`` in it. The module object in
    ``sys.modules`` stays the same one, so a thread that took it while it was initializing
    (it waits on the module lock this thread holds) ends up with the whole package, and
    ``importlib.reload`` does the same again in place. With no other ``kernels`` the
    import fails as it would without this folder.
    """
    import builtins
    import os
    import sys

    spec = _other_kernels_spec()
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named 'kernels' ({os.path.dirname(__file__)} is megatron_r1v.kernels, "
            "never a top-level 'kernels')", name="kernels")
    module = sys.modules["kernels"]
    spec._initializing = True  # before the module shows this spec: other importers wait
    try:
        namespace.clear()
        namespace.update(__name__="kernels", __spec__=spec, __loader__=spec.loader, __package__="kernels",
                         __builtins__=builtins)
        if spec.origin and spec.has_location:
            namespace["__file__"] = spec.origin
        if spec.cached:
            namespace["__cached__"] = spec.cached
        if spec.submodule_search_locations is not None:
            namespace["__path__"] = spec.submodule_search_locations
        if spec.loader is not None:
            spec.loader.exec_module(module)
    finally:
        spec._initializing = False


def _other_kernels_spec():
    """The spec of the first ``kernels`` that is not a megatron-r1v copy, in import order."""
    import importlib.machinery
    import os
    import sys

    passed_over: set[str] = {os.path.dirname(os.path.dirname(os.path.realpath(__file__)))}
    while True:
        search = [entry for entry in sys.path if _folder_of(entry) not in passed_over]
        spec = None
        for finder in sys.meta_path:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec("kernels", search)
            elif getattr(finder, "find_spec", None) is not None:
                spec = finder.find_spec("kernels", None)
            if spec is not None and _copy_holder(spec) not in passed_over:
                break
            spec = None
        holder = _copy_holder(spec) if spec is not None else None
        if holder is None:
            return spec
        # Another checkout (a git worktree, a PYTHONPATH entry): pass over its folder too,
        # or the two copies would hand the name to each other forever.
        passed_over.add(holder)


def _folder_of(entry) -> str | None:
    """The real path of a ``sys.path`` entry ('' is the working directory); None when it is no path."""
    import os

    try:
        return os.path.realpath(os.fspath(entry) or os.curdir)
    except TypeError:
        return None


def _copy_holder(spec) -> str | None:
    """The folder holding ``spec``'s package when it is a copy of this one (its __init__.py
    carries the marker), else None."""
    import os

    origin = getattr(spec, "origin", None)
    if not origin or os.path.basename(origin) != "__init__.py":
        return None
    try:
        with open(origin, encoding="utf-8") as init_file:
            is_copy = _TOP_LEVEL_MARKER in init_file.read()
    except OSError:
        return None
    return os.path.dirname(os.path.dirname(os.path.realpath(origin))) if is_copy else None


if __name__ == "kernels":
    _hand_over_top_level_name(globals())
else:
    from .dispatch import BACKENDS, resolve_backend
    from .grpo import GRPOStats, grpo_loss
    from .vocab_parallel import vocab_parallel_logprobs

    __all__ = ["BACKENDS", "GRPOStats", "grpo_loss", "resolve_backend", "vocab_parallel_logprobs"]
