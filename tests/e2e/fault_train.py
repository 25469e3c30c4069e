"""``torchrun tests/e2e/fault_train.py [train arguments]``: ``python -m megatron_r1v.train``
with one fault injected, for tests/e2e/test_fault_injection.py.

R1V_FAULT=enospc:RANK:MATCH makes ``torch.save`` on rank RANK raise ``OSError(ENOSPC)``,
as a disk that fills during a checkpoint save does: MATCH ``#N`` fails the N-th call (the
first ones are Megatron's dist-checkpoint writes of the first save), any other MATCH the
first call whose destination path contains it. The fault wraps the library call, so the
trainer runs unchanged.
"""

import errno
import os
import sys

import torch

from megatron_r1v.train import main


def _inject(spec: str) -> None:
    kind, rank, match = spec.split(":", 2)
    if kind != "enospc":
        raise SystemExit(f"unknown fault {spec!r}")
    if os.environ.get("RANK", "0") != rank:
        return
    real, calls = torch.save, [0]

    def failing_save(obj, f, *args, **kwargs):
        calls[0] += 1
        hit = calls[0] == int(match[1:]) if match.startswith("#") else isinstance(f, (str, os.PathLike)) and \
            match in str(f)
        if hit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    torch.save = failing_save


if __name__ == "__main__":
    _inject(os.environ["R1V_FAULT"])
    sys.exit(main(sys.argv[1:]))
