"""How a recipe's predicted step moves with its main knobs: a table and a PNG.

Each variant is one change to the recipe (a ``--set`` override, an assumption, or the
one-step-off layout of :func:`one_step_off`: engines on half the GPUs, training on the other
half, generation of step k+1 overlapping the training of step k), predicted with the same
efficiency factors as the baseline. Variants whose layout does not divide the GPUs are
skipped with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from megatron_r1v.config import RunConfig
from megatron_r1v.step_time.hardware import Efficiency, gpu_spec
from megatron_r1v.step_time.plan import StepTime, predict, workload_from_config
from megatron_r1v.step_time.workload import Assumptions, Workload

GROUPS = {"rollout": ("rollout_prefill", "rollout_decode"), "reward": ("reward",), "log-probs": ("logprob",),
          "training": ("train_compute", "train_bubble", "train_tp_comm", "train_dp_comm", "optimizer", "offload"),
          "sync + switch + ckpt": ("weight_sync", "engine_switch", "checkpoint")}


@dataclass(frozen=True)
class Variant:
    knob: str
    value: str
    config: dict
    """Dotted run-config keys -> values."""
    assume: dict
    split_rollout: bool = False
    """One step off-policy (:func:`one_step_off`): half the GPUs roll out, the other half train."""


@dataclass
class SensitivityRow:
    knob: str
    value: str
    step_s: Optional[float]
    tokens_per_s_per_gpu: Optional[float]
    train_mfu: Optional[float]
    groups_s: dict[str, float]
    note: str = ""


def default_variants(cfg: RunConfig) -> list[Variant]:
    """The knobs of the issue: response length, samples per prompt, TP/PP/DP, colocated vs async,
    FP8 and recomputation (GRPO); sequence length and TP/PP (MPO / SFT)."""
    p = cfg.parallel
    out = [Variant("baseline", "recipe", {}, {})]
    if cfg.train.stage == "grpo":
        out += [Variant("mean response", f"{f:g} x max_new_tokens", {}, {"mean_response_frac": f})
                for f in (0.25, 0.75)]
        out += [Variant("samples per prompt", str(n), {"rollout.n_samples": n}, {}) for n in (4, 16)]
        out += [Variant("layout", "one step off (half the GPUs roll out)", {}, {}, split_rollout=True)]
    else:
        out += [Variant("mean sequence", f"{f:g} x seq_length", {}, {"mpo_sequence_frac": f}) for f in (0.25, 0.75)]
    out += [Variant("parallel", f"tp {t} pp {q}", {"parallel.tp": t, "parallel.pp": q}, {})
            for t, q in ((p.tp // 2, p.pp), (p.tp, p.pp * 2), (p.tp, max(p.pp // 2, 1))) if (t, q) != (p.tp, p.pp)]
    out += [Variant("fp8", "off", {"model.fp8.format": None}, {}),
            Variant("recomputation", "off", {"model.recompute_granularity": None}, {})]
    return out


def _apply(cfg: RunConfig, changes: dict) -> RunConfig:
    new = dataclasses.replace(cfg)
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        obj = new
        for part in path:
            child = dataclasses.replace(getattr(obj, part))
            setattr(obj, part, child)
            obj = child
        setattr(obj, key, value)
    return new


def one_step_off(w: Workload, rollout_gpus: int, mem_fraction: float = 0.85) -> Workload:
    """``rollout.mode: async`` as this project runs it (``trainer/grpo_async.py``): the engines on
    ``rollout_gpus`` GPUs of their own (a whole GPU each: ``mem_fraction`` of it for weights + KV,
    SGLang's static pool), training on the remaining ones, weights synced through host memory
    (``rollout/engine_process.py``); ``plan.step_seconds`` overlaps the two sides."""
    if not 0 < rollout_gpus < w.gpus:
        raise ValueError(f"one step off: {rollout_gpus} rollout GPUs of {w.gpus}")
    rollout = dataclasses.replace(w.rollout, gpus=rollout_gpus, kv_tokens=None, mem_fraction=mem_fraction)
    return dataclasses.replace(w, gpus=w.gpus - rollout_gpus, rollout=rollout, sync_path="host")


def _one(cfg: RunConfig, gpus: int, gpu: str, eff: Efficiency, assume: Assumptions,
         v: Variant) -> tuple[StepTime, str]:
    """The variant's prediction, and a note when the memory plan says it does not fit."""
    from megatron_r1v.memory_plan import plan_memory

    spec, changed = gpu_spec(gpu), _apply(cfg, v.config)
    w, _ = workload_from_config(changed, gpus, spec, assume.with_overrides(v.assume), eff)
    note = "" if plan_memory(changed, gpus, spec.memory_gb).fits else "memory plan: does not fit"
    if v.split_rollout and w.rollout is not None:
        w = one_step_off(w, gpus // 2)
        note = "memory not planned (tools/plan_memory.py plans colocated engines only)"
    return predict(w, spec, eff), note


def sensitivity(cfg: RunConfig, gpus: int, gpu: str = "h100-sxm", eff: Optional[Efficiency] = None,
                assume: Optional[Assumptions] = None, variants: Optional[list[Variant]] = None) -> list[SensitivityRow]:
    eff, assume = eff or Efficiency(), assume or Assumptions()
    rows = []
    for v in variants if variants is not None else default_variants(cfg):
        try:
            s, note = _one(cfg, gpus, gpu, eff, assume, v)
        except ValueError as err:
            rows.append(SensitivityRow(v.knob, v.value, None, None, None, {}, f"skipped: {err}"))
            continue
        groups = {g: sum(s.phases_s.get(k, 0.0) for k in keys) for g, keys in GROUPS.items()}
        rows.append(SensitivityRow(v.knob, v.value, s.step_s, s.tokens_per_s_per_gpu, s.train_mfu, groups, note))
    return rows


def plot_sensitivity(tables: dict[str, list[SensitivityRow]], out: Union[str, Path]) -> Path:
    """Stacked horizontal bars (seconds per step by phase group), one panel per recipe."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from megatron_r1v.atomic_dir import atomic_file

    figure = Figure(figsize=(9.0, 3.2 * len(tables)), layout="constrained")
    FigureCanvasAgg(figure)
    for i, (title, rows) in enumerate(tables.items()):
        axes = figure.add_subplot(len(tables), 1, i + 1)
        rows = [r for r in rows if r.step_s is not None]
        labels = [f"{r.knob}: {r.value}" for r in rows]
        left = [0.0] * len(rows)
        for group in GROUPS:
            widths = [r.groups_s[group] for r in rows]
            axes.barh(labels, widths, left=left, label=group)
            left = [a + b for a, b in zip(left, widths)]
        # A one-step-off step overlaps rollout and training: its step is shorter than the bar.
        axes.scatter([r.step_s for r in rows], labels, marker="|", s=300, color="black", label="step", zorder=3)
        axes.invert_yaxis()
        axes.set_xlabel("predicted seconds per step (model, not measured)")
        axes.set_title(title, fontsize=10)
        axes.tick_params(axis="y", labelsize=8)
        axes.legend(fontsize=7, loc="lower right")
    with atomic_file(out, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    return Path(out)
