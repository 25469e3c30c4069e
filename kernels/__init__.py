"""Fused Triton kernels, installed as ``megatron_r1v.kernels`` (never a top-level ``kernels``).

The vocab-parallel log-prob and clipped-ratio GRPO loss kernels arrive with their own
issue; this package is where they live, next to their autograd Functions and the
backend dispatch (triton / torch).
"""

# This file must stay importable as a top-level ``kernels`` too, without side effects
# and without ``__version__``: run from the repository root (cwd on sys.path),
# transformers' probe for Hugging Face's ``kernels`` finds this folder, imports it, and
# concludes from the missing version that the real package is absent.
