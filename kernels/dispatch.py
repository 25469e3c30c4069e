"""Backend choice for the fused log-prob / GRPO kernels.

``triton``     the Triton kernels compiled for CUDA tensors (the GPU production path).
``interpret``  the same Triton kernels run by Triton's interpreter on CPU tensors. Triton
               decides this when it is imported, so ``TRITON_INTERPRET=1`` must be in the
               environment before anything imports ``triton`` (the test suite sets it).
``torch``      the same math in plain torch, chunked over rows and vocabulary so no fp32
               ``[T, V]`` buffer exists (the CPU production path, and the GPU fallback).
``auto``       ``triton`` for CUDA tensors when Triton compiles, else ``torch``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "interpret", "torch")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    # find_spec walks sys.path: tens of microseconds, too slow for every loss call.
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter in this process."""
    if not triton_installed():
        return False
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; a clear error when it cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    has_triton = triton_installed()
    if backend == "auto":
        if device.type == "cuda" and has_triton and not triton_interpreting():
            return "triton"
        return "torch"
    if backend == "triton":
        if device.type != "cuda":
            raise ValueError(f"backend='triton' needs CUDA tensors, got {device}; use 'torch' or 'interpret'")
        if not has_triton:
            raise ImportError("backend='triton' needs the triton package (pip install triton)")
        if triton_interpreting():
            raise ValueError("backend='triton' cannot run while TRITON_INTERPRET=1; use backend='interpret'")
    if backend == "interpret":
        if device.type != "cpu":
            raise ValueError(f"backend='interpret' runs on CPU tensors, got {device}")
        if not has_triton:
            raise ImportError("backend='interpret' needs the triton package (pip install triton)")
        if not triton_interpreting():
            raise ValueError(
                "backend='interpret' needs TRITON_INTERPRET=1 in the environment before triton is first imported"
            )
    return backend


def backend_module(backend: str) -> ModuleType:
    """The implementation module of a concrete backend (imported lazily: Triton is optional)."""
    if backend in ("triton", "interpret"):
        from . import triton_impl

        return triton_impl
    from . import torch_impl

    return torch_impl
