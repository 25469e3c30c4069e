"""The learning-rate schedule of a run: warm-up, then constant / linear / cosine to min_lr."""

import math

import pytest

from megatron_r1v.config import OptimizerConfig, load_config
from megatron_r1v.trainer.setup import build_lr_scheduler


class _Groups:
    """What the scheduler touches of an optimizer: its parameter groups."""

    def __init__(self):
        self.param_groups = [{"lr": None, "weight_decay": None}]


def _lrs(cfg: OptimizerConfig, total: int, start: int = 0) -> list[float]:
    opt = _Groups()
    scheduler = build_lr_scheduler(opt, cfg, total)
    if start:
        scheduler.step(start)
    out = []
    for _ in range(start, total):
        out.append(opt.param_groups[0]["lr"])
        scheduler.step(1)
    return out


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_schedule_values(style):
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_steps=2, lr_decay_style=style)
    got = _lrs(cfg, 6)
    # Written out: steps 0..2 warm up linearly from 0; then decay over steps 2..6.
    expected = [0.0, 0.5, 1.0]
    for step in range(3, 6):
        ratio = (step - 2) / 4
        coeff = {"constant": 1.0, "linear": 1 - ratio, "cosine": 0.5 * (math.cos(math.pi * ratio) + 1)}[style]
        expected.append(0.1 + 0.9 * coeff if style != "constant" else 1.0)
    assert got == pytest.approx(expected, abs=1e-12)
    # A resumed run (3 steps done) sees exactly the rest of the schedule.
    assert _lrs(cfg, 6, start=3) == pytest.approx(expected[3:], abs=1e-12)


def test_no_warmup_starts_at_lr_and_errors_name_keys():
    assert _lrs(OptimizerConfig(lr=2.0, min_lr=0.0, lr_decay_style="linear"), 4) == pytest.approx([2.0, 1.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="optimizer.lr_warmup_steps"):
        load_config(None, ["train.steps=3", "optimizer.lr_warmup_steps=3"])
    with pytest.raises(ValueError, match="optimizer.min_lr"):
        load_config(None, ["optimizer.lr=1e-5", "optimizer.min_lr=1e-4"])
