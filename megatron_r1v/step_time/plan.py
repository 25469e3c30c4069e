"""A recipe (or a published run) -> the predicted step: phases, step time, tokens/s/GPU, MFU.

:func:`predict` adds the phases of ``phases.py``: a colocated step runs them one after the
other; with rollout GPUs of its own (one step off-policy) the rollout side (prefill,
decode) overlaps the training side (log-probs, training, optimizer) and the step takes the
longer of the two plus what runs while the engine is idle: as ``trainer/grpo_async.py`` orders
a step (take step k's rollout -> score it -> sync W_k into the idle engine -> start step k+1's
generation -> train step k), scoring, the weight sync and a checkpoint (which first waits for
the generation in flight) are serial:

    step = max(prefill + decode, log-probs + training + optimizer) + reward + weight sync + checkpoint
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_r1v.config import RunConfig
from megatron_r1v.step_time import phases
from megatron_r1v.step_time.hardware import Efficiency, GpuSpec
from megatron_r1v.step_time.workload import Assumptions, Layout, Rollout, Workload, arch_spec

ROLLOUT_SIDE = ("rollout_prefill", "rollout_decode")
SERIAL = ("reward", "weight_sync", "checkpoint")
"""One step off: phases neither side overlaps (the engine is idle, the trainer waits on them)."""
TRAIN_PARTS = ("train_compute", "train_bubble", "train_tp_comm", "train_dp_comm", "optimizer")
PHASE_ORDER = ("rollout_prefill", "rollout_decode", "reward", "logprob", "train_compute", "train_bubble",
               "train_tp_comm", "train_dp_comm", "optimizer", "offload", "weight_sync", "engine_switch", "checkpoint")


@dataclass
class StepTime:
    """The prediction for one step (seconds; shares are fractions of the step)."""

    name: str
    gpu: str
    gpus: int
    phases_s: dict[str, float]
    step_s: float
    shares: dict[str, float]
    tokens_per_step: float
    tokens_per_s_per_gpu: float
    train_mfu: float
    """Model FLOPs of forward + backward / (training-phase seconds x GPUs x bf16 peak)."""
    step_mfu: float
    """The same FLOPs over the whole step."""
    concurrency: Optional[int] = None
    sequences_per_engine: Optional[float] = None
    assumptions: dict[str, object] = field(default_factory=dict)
    efficiency: dict[str, float] = field(default_factory=dict)


def step_seconds(w: Workload, p: dict[str, float]) -> float:
    """Colocated: the phases one after the other. One step off (rollout GPUs of its own): the
    longer of the rollout side and the training side, plus the serial phases (module docstring)."""
    if w.rollout is None or not w.rollout.gpus:
        return sum(p.values())
    rollout = sum(p.get(k, 0.0) for k in ROLLOUT_SIDE)
    train = sum(v for k, v in p.items() if k not in ROLLOUT_SIDE and k not in SERIAL)
    return max(rollout, train) + sum(p.get(k, 0.0) for k in SERIAL)


def predict(w: Workload, gpu: GpuSpec, eff: Efficiency) -> StepTime:
    p: dict[str, float] = {}
    p.update(phases.rollout_seconds(w, gpu, eff))
    p["reward"] = phases.reward_seconds(w, gpu, eff)
    p["logprob"] = phases.logprob_seconds(w, gpu, eff)
    p.update(phases.train_seconds(w, gpu, eff))
    p["offload"] = phases.offload_seconds(w, gpu, eff)
    p["weight_sync"] = phases.weight_sync_seconds(w, gpu, eff)
    p["engine_switch"] = phases.engine_switch_seconds(w, eff)
    p["checkpoint"] = phases.checkpoint_seconds(w, eff)
    p = {k: p[k] for k in PHASE_ORDER if k in p}
    step, gpus = step_seconds(w, p), w.gpus + (w.rollout.gpus if w.rollout is not None else 0)
    model, _ = phases.train_flops(w)
    train_s = sum(p[k] for k in TRAIN_PARTS)
    peak = gpu.bf16_tflops * 1e12
    out = StepTime(w.name, gpu.name, gpus, p, step, {k: v / step for k, v in p.items()}, w.tokens,
                   w.tokens / step / gpus, model.total * w.train_epochs / (train_s * w.gpus * peak),
                   model.total * w.train_epochs / (step * gpus * peak))
    if w.rollout is not None:
        d = phases.decode_shape(w, gpu, eff)
        out.concurrency, out.sequences_per_engine = d.concurrency, d.sequences_per_engine
    out.efficiency = dict(vars(eff))
    return out


def _tiles(cfg: RunConfig, spec, assume: Assumptions) -> float:
    if not spec.vision_layers:
        return 0.0
    if assume.tiles is not None:
        return assume.tiles
    return float(cfg.data.max_tiles + 1 if cfg.data.max_tiles > 1 else 1)


def _rollout(cfg: RunConfig, gpus: int, gpu: GpuSpec) -> Rollout:
    """The colocated SGLang engine (tp = parallel.tp); its KV pool is the memory plan's."""
    from megatron_r1v.memory_plan import plan_memory

    r = cfg.rollout
    kv = None
    if r.engine == "sglang":
        plan = plan_memory(cfg, gpus, gpu.memory_gb)
        kv = plan.rollout.kv_tokens if plan.rollout is not None else None
    return Rollout(tp=cfg.parallel.tp, mem_fraction=r.mem_fraction_static, max_running=r.max_running_requests,
                   kv_tokens=kv)


def workload_from_config(cfg: RunConfig, gpus: int, gpu: GpuSpec, assume: Assumptions,
                         eff: Efficiency) -> tuple[Workload, dict[str, object]]:
    """The Workload of a recipe, and the assumptions it used (printed with the plan)."""
    from megatron_r1v.memory_plan import FREEZE_PARTS, check_layout, planned_arch

    check_layout(cfg, gpus)
    arch = planned_arch(cfg)
    spec = arch_spec(cfg.model.preset or str(cfg.model.checkpoint), arch)
    tiles = _tiles(cfg, spec, assume)
    prompt = assume.text_prompt_tokens + tiles * spec.tokens_per_tile
    trains = frozenset(FREEZE_PARTS[cfg.model.freeze])
    trainable = sum(getattr(spec, a) for a, part in (("params", "language_model"), ("vision_params", "vision"),
                                                     ("adapter_params", "adapter")) if part in trains)
    p, stage = cfg.parallel, cfg.train.stage
    common = dict(name=f"{spec.name} {stage}", model=spec, gpus=gpus,
                  layout=Layout(p.tp, p.pp, p.cp, 1, "megatron", cfg.optimizer.use_distributed_optimizer),
                  tiles_per_sequence=tiles, trains=trains, recompute=cfg.model.recompute_granularity,
                  fp8=cfg.model.fp8.format is not None and cfg.model.backend != "local",
                  checkpoint_bytes=2 * spec.total_params + 12 * trainable,
                  checkpoint_interval=cfg.train.save_interval)
    used: dict[str, object] = {"tiles_per_prompt": tiles, "prompt_tokens": prompt}
    if stage == "grpo":
        n = cfg.grpo.prompts_per_step * cfg.rollout.n_samples
        response = assume.mean_response_frac * cfg.rollout.max_new_tokens
        rm = assume.reward_model_params if cfg.reward.model_weight > 0 else 0.0
        w = Workload(**common, sequences=n, prompt_tokens=prompt, response_tokens=response,
                     max_response_tokens=float(cfg.rollout.max_new_tokens),
                     micro_batch_tokens=cfg.grpo.micro_batch_tokens, rollout=_rollout(cfg, gpus, gpu),
                     prompts=cfg.grpo.prompts_per_step, logprob_passes=1 + (cfg.grpo.kl_beta > 0),
                     train_epochs=cfg.grpo.ppo_epochs, reward_model_params=rm, reward_gpus=assume.reward_gpus,
                     sync_path="ipc", sync_bytes=2 * trainable, sync_gather=p.tp * p.pp > 1)
        used.update(mean_response_tokens=response, reward_model_params=rm, reward_gpus=assume.reward_gpus)
    else:
        seq = assume.mpo_sequence_frac * cfg.train.seq_length
        n = 2 * cfg.mpo.pairs_per_step if stage == "mpo" else cfg.sft.samples_per_step
        mbt = cfg.mpo.micro_batch_tokens if stage == "mpo" else cfg.sft.micro_batch_tokens
        w = Workload(**common, sequences=n, prompt_tokens=min(prompt, seq), response_tokens=max(seq - prompt, 0.0),
                     max_response_tokens=max(seq - prompt, 0.0), micro_batch_tokens=mbt,
                     logprob_passes=1 if stage == "mpo" else 0)
        used.update(mean_sequence_tokens=seq)
        if stage == "mpo":
            used["reference_pass"] = "counted every step (the reference cache makes it once per prompt)"
    return w, used
