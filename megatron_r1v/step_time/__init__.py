"""Step-time model of a recipe on N GPUs: where a step's seconds go (``docs/step_time.md``).

``tools/plan_step_time.py`` is the command line; :func:`plan_step_time` the entry point.
"""

from __future__ import annotations

from typing import Optional

from megatron_r1v.config import RunConfig
from megatron_r1v.step_time.hardware import (FRAMEWORKS, GPUS, Efficiency, Framework, GpuSpec, calibrate,
                                              framework_efficiency, gpu_spec)
from megatron_r1v.step_time.plan import StepTime, predict, workload_from_config
from megatron_r1v.step_time.workload import Assumptions, Workload

__all__ = ["FRAMEWORKS", "GPUS", "Assumptions", "Efficiency", "Framework", "GpuSpec", "StepTime", "Workload",
           "calibrate", "framework_efficiency", "gpu_spec", "plan_step_time", "predict", "workload_from_config"]


def plan_step_time(cfg: RunConfig, gpus: int, gpu: str = "h100-sxm", eff: Optional[Efficiency] = None,
                   assume: Optional[Assumptions] = None) -> StepTime:
    """The predicted step of ``cfg`` on ``gpus`` GPUs of kind ``gpu`` (a key of ``GPUS``)."""
    spec, eff, assume = gpu_spec(gpu), eff or Efficiency(), assume or Assumptions()
    w, used = workload_from_config(cfg, gpus, spec, assume, eff)
    out = predict(w, spec, eff)
    out.assumptions = used
    return out
