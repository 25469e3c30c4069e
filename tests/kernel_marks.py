"""Which fused-kernel backends this test process can run, and pytest params marked with them.

``triton.jit`` decides from ``TRITON_INTERPRET`` whether a kernel is interpreted or compiled
when the kernel module is imported, so one process either interprets every Triton kernel
(CPU tensors: the ``interpret`` backend) or compiles every one (CUDA tensors: ``triton``);
tests/conftest.py chooses before anything imports the kernels.
A test names the backend it runs with ``@pytest.mark.kernel_backend(name)`` (or the params
of :func:`kernel_backends`); tests/conftest.py skips it, with the reason, where this
process cannot run that backend.
"""

from typing import Optional

import pytest
import torch


def kernel_backend_unavailable(backend: str) -> Optional[str]:
    """Why this process cannot run the kernels' ``backend``, or None when it can. Every reason
    is about CUDA: no GPU for the compiled backend, or a CUDA process that compiles its kernels
    and leaves the interpreter cases to a second pass. A missing triton is a broken test
    environment (the test extra installs it), an error, not a skip."""
    from megatron_r1v.kernels.dispatch import triton_installed, triton_interpreting

    if backend not in ("torch", "interpret", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r} in a kernel_backend mark")
    if backend == "torch":
        return None
    if not triton_installed():
        raise RuntimeError("triton is not installed: the test extra installs it (bash tests/run.sh)")
    if backend == "interpret" and not triton_interpreting():
        return ("Triton compiles kernels in this process (a CUDA host); the interpreter cases run in a "
                "second pass: TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= bash tests/run.sh -m kernel_backend")
    if backend == "triton" and not torch.cuda.is_available():
        return "the compiled Triton backend needs a CUDA GPU"
    if backend == "triton" and triton_interpreting():
        return "TRITON_INTERPRET=1 is set: this process interprets Triton kernels instead of compiling them"
    return None


def kernel_backends(*names: str) -> list:
    """``names`` as pytest params, each marked with the backend it runs (for ``parametrize``)."""
    return [pytest.param(name, marks=pytest.mark.kernel_backend(name), id=name) for name in names]
