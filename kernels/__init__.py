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
"""

# This file must stay importable as a top-level ``kernels`` too, without side effects
# and without ``__version__``: run from the repository root (cwd on sys.path),
# transformers' probe for Hugging Face's ``kernels`` finds this folder, imports it, and
# concludes from the missing version that the real package is absent. Triton is
# imported only when a Triton backend is first used.
from .dispatch import BACKENDS, resolve_backend
from .grpo import GRPOStats, grpo_loss
from .vocab_parallel import vocab_parallel_logprobs

__all__ = ["BACKENDS", "GRPOStats", "grpo_loss", "resolve_backend", "vocab_parallel_logprobs"]
