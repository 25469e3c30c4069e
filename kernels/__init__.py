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
setuptools loads its entry points). Python puts the working directory or a script's folder
first on ``sys.path``, so from the repository root this folder is found under that name
before site-packages. Imported as ``kernels``, this file therefore runs only
:func:`_hand_over_top_level_name` and none of the modules below: the name always resolves
to Hugging Face's package, or is missing, whatever the working directory and whether or
not ``PYTHONSAFEPATH`` is set (tests/unit/test_package.py).
"""

from __future__ import annotations


def _hand_over_top_level_name() -> None:
    """Load the ``kernels`` that ``sys.path`` holds outside this repository into ``sys.modules``.

    The import system returns the ``sys.modules`` entry a module leaves under its own name
    (importlib's ``_load_unlocked``), so ``import kernels`` gives Hugging Face's package; when
    no other ``kernels`` exists the import fails as it would without this folder.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    # The folder holding this package (the repository root, or wherever a copy was put).
    holder = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    search = [entry for entry in sys.path if os.path.realpath(os.fspath(entry) or os.curdir) != holder]
    spec = importlib.machinery.PathFinder.find_spec("kernels", search)
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named 'kernels' ({os.path.join(holder, 'kernels')} is megatron_r1v.kernels, "
            "never a top-level 'kernels')", name="kernels")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: the package imports its own submodules by absolute name.
    sys.modules["kernels"] = module
    if spec.loader is not None:
        spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_top_level_name()
else:
    from .dispatch import BACKENDS, resolve_backend
    from .grpo import GRPOStats, grpo_loss
    from .vocab_parallel import vocab_parallel_logprobs

    __all__ = ["BACKENDS", "GRPOStats", "grpo_loss", "resolve_backend", "vocab_parallel_logprobs"]
