"""``torchrun tests/e2e/fault_train.py [train arguments]``: ``python -m megatron_r1v.train``
with one fault injected, for tests/e2e/test_fault_injection.py.

R1V_FAULT=enospc:RANK:MATCH makes ``torch.save`` on rank RANK raise ``OSError(ENOSPC)``,
as a disk that fills during a checkpoint save does (``kill:RANK:MATCH``: SIGKILL the rank
there instead, a kill -9 in the middle of a save): MATCH ``#N`` fails the N-th call (the
first ones are Megatron's dist-checkpoint writes of the first save), any other MATCH the
first call whose destination path contains it. R1V_FAULT=nan:RANK:N puts a NaN into one
gradient on rank RANK in the N-th optimizer step (after the backward pass, before the
step). The faults wrap library calls, so the trainer runs unchanged.
"""

import errno
import os
import signal
import sys

import torch

from megatron_r1v.train import main


def _inject(spec: str) -> None:
    kind, rank, match = spec.split(":", 2)
    if kind not in ("enospc", "kill", "nan"):
        raise SystemExit(f"unknown fault {spec!r}")
    if os.environ.get("RANK", "0") != rank:
        return
    if kind == "nan":
        _inject_nan(int(match))
        return
    real, calls = torch.save, [0]

    def failing_save(obj, f, *args, **kwargs):
        calls[0] += 1
        hit = calls[0] == int(match[1:]) if match.startswith("#") else isinstance(f, (str, os.PathLike)) and \
            match in str(f)
        if hit and kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if hit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    torch.save = failing_save


def _inject_nan(step_call: int) -> None:
    from megatron_r1v.trainer import grpo, mpo, schedule

    real, calls = schedule.optimizer_step, [0]

    def step_with_nan(ddp_model, optimizer, forward_backward, where):
        calls[0] += 1

        def poisoned():
            result = forward_backward()
            if calls[0] == step_call:
                grad = next(p.main_grad for p in ddp_model.parameters() if p.requires_grad)
                grad.view(-1)[0] = float("nan")
            return result

        return real(ddp_model, optimizer, poisoned, where)

    mpo.optimizer_step = grpo.optimizer_step = step_with_nan


if __name__ == "__main__":
    _inject(os.environ["R1V_FAULT"])
    sys.exit(main(sys.argv[1:]))
