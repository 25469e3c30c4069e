"""The metrics of a training run: every tag a stage emits, and one logger for all sinks.

A trainer's ``step()`` returns ``{tag: value}`` on every rank (the values are already
reduced over ranks). :class:`MetricsLogger` adds the learning rate and memory, then, on
rank 0 only, prints the progress line every ``logging.log_interval`` steps, writes the
TensorBoard scalars (``logging.tensorboard_dir``) and appends a JSON line per step
(``--metrics-jsonl``). The tag lists below are complete: the logger refuses a tag that
is not declared, so a new metric is added here first, and the end-to-end tests check
that every declared tag reaches TensorBoard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

# perf/data_time_s (every stage): seconds this step spent preparing its records in data.loader
# (reading and tiling images, the chat template). Like every perf/ tag it is rank 0's own, and
# rank 0 tiles for its replica (data/replica_tiling.py), so it includes the tiling.
MPO_TAGS = (
    "mpo/loss", "mpo/pref_loss", "mpo/quality_loss", "mpo/gen_loss", "mpo/reward_margin", "mpo/accuracy",
    "mpo/delta", "mpo/chosen_reward", "mpo/rejected_reward", "train/grad_norm", "perf/step_time_s",
    "perf/data_time_s",
)
GRPO_TAGS = (
    "train/reward_mean", "train/accuracy", "train/format_reward", "train/rm_reward", "train/grpo_loss", "train/kl",
    "train/clip_fraction", "train/entropy", "train/response_length", "train/grad_norm", "reward/overlong_penalty",
    "ssb/effective_ratio_fresh", "ssb/effective_ratio_batch", "ssb/size", "ssb/reused_groups",
    "ssb/reused_samples", "ssb/aged_out", "rollout/logprob_abs_diff",
    "perf/step_time_s", "perf/rollout_time_s", "perf/train_time_s", "perf/weight_sync_time_s", "perf/data_time_s",
    "perf/rollout_wait_s", "perf/overlap_s",
)
# sft/loss: token-mean NLL over every assistant token of the step (losses/sft.py); sft/tokens_per_s:
# all tokens of the step's conversations (prompts, image tokens, replies; no padding) over all DP
# ranks / step time; sft/assistant_tokens: the step's assistant tokens (the loss's N); sft/lr: the
# step's learning rate (train/lr under the stage's prefix).
SFT_TAGS = (
    "sft/loss", "sft/tokens_per_s", "sft/assistant_tokens", "sft/lr", "train/grad_norm", "perf/step_time_s",
    "perf/data_time_s",
)
# perf/rollout_wait_s (GRPO): seconds the trainer waited for its rollout's generation (sync mode: all of
# it); perf/overlap_s: seconds of that generation that ran while the trainer trained (rollout.mode async).
# GRPO with rollout.tis_cap (always in async mode): the mean TIS weight and the share of weights cut at the cap.
TIS_TAGS = ("rollout/tis_weight_mean", "rollout/tis_truncated_fraction")
# GRPO with grpo.kl_placement reward: the mean beta sum_t KL_t subtracted from a fresh response's reward.
KL_REWARD_TAGS = ("train/kl_penalty",)
# GRPO with grpo.dynamic_sampling: rollout rounds of the step, effective groups kept / groups drawn.
DYNAMIC_SAMPLING_TAGS = ("dynamic_sampling/rounds", "dynamic_sampling/kept_fraction")
# Tags a GRPO logger accepts even when its caller did not say the switch is on (stage_tags' flags):
# they are declared here, emitted only with their switch.
GRPO_SWITCH_TAGS = TIS_TAGS + KL_REWARD_TAGS + DYNAMIC_SAMPLING_TAGS
# Added by the logger: the learning rate of the step and this process's memory.
COMMON_TAGS = ("train/lr", "perf/host_rss_gb")
# With a CUDA device: the step's peak allocated and reserved memory of this rank's device.
DEVICE_MEMORY_TAGS = ("perf/device_memory_peak_gb", "perf/device_memory_reserved_peak_gb")


def stage_tags(stage: str, tis: bool = False, device: Optional[torch.device] = None, *, kl_reward: bool = False,
               dynamic_sampling: bool = False) -> tuple[str, ...]:
    """Every tag a run of ``stage`` emits (``tis``: GRPO with ``rollout.tis_cap``; ``kl_reward``: with
    ``grpo.kl_placement`` reward; ``dynamic_sampling``: with ``grpo.dynamic_sampling``)."""
    if stage not in ("sft", "mpo", "grpo"):
        raise ValueError(f"no metrics are declared for stage {stage!r}")
    switches = (TIS_TAGS if tis else ()) + (KL_REWARD_TAGS if kl_reward else ()) + \
        (DYNAMIC_SAMPLING_TAGS if dynamic_sampling else ())
    tags = {"sft": SFT_TAGS, "mpo": MPO_TAGS}.get(stage) or GRPO_TAGS + switches
    memory = DEVICE_MEMORY_TAGS if device is not None and device.type == "cuda" else ()
    return tags + COMMON_TAGS + memory


def progress_line(stage: str, step: int, total: int, metrics: dict) -> str:
    """The one line a step prints on rank 0."""
    if stage == "sft":
        return (f"step {step + 1}/{total} | loss {metrics['sft/loss']:.4f} | "
                f"{metrics['sft/assistant_tokens']:.0f} assistant tokens | "
                f"{metrics['sft/tokens_per_s']:.0f} tokens/s | lr {metrics['sft/lr']:.3e} | "
                f"step time {metrics['perf/step_time_s']:.1f}s")
    if stage == "mpo":
        return (f"step {step + 1}/{total} | loss {metrics['mpo/loss']:.4f} (pref {metrics['mpo/pref_loss']:.4f}, "
                f"quality {metrics['mpo/quality_loss']:.4f}, gen {metrics['mpo/gen_loss']:.4f}) | "
                f"reward margin {metrics['mpo/reward_margin']:+.4f} | accuracy {metrics['mpo/accuracy']:.2f} | "
                f"delta {metrics['mpo/delta']:+.4f} | step time {metrics['perf/step_time_s']:.1f}s")
    return (f"step {step + 1}/{total} | reward {metrics['train/reward_mean']:.3f} | "
            f"accuracy {metrics['train/accuracy']:.3f} | effective ratio {metrics['ssb/effective_ratio_fresh']:.2f}"
            f" -> {metrics['ssb/effective_ratio_batch']:.2f} | loss {metrics['train/grpo_loss']:+.3e} | "
            f"step time {metrics['perf/step_time_s']:.1f}s")


def memory_metrics(device: torch.device) -> dict[str, float]:
    """This process's resident memory and, on CUDA, the device's peaks since the last call (GiB)."""
    import psutil

    out = {"perf/host_rss_gb": psutil.Process().memory_info().rss / 2**30}
    if device.type == "cuda":
        out["perf/device_memory_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["perf/device_memory_reserved_peak_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out


class MetricsLogger:
    """Rank 0's sinks for a run's per-step metrics: the progress line, TensorBoard, JSONL.

    Every rank calls :meth:`log` (it only measures memory elsewhere); use as a context
    manager so the TensorBoard writer is closed on any exit.
    """

    def __init__(self, tags: tuple[str, ...], *, stage: str, total_steps: int, log_interval: int,
                 device: torch.device, is_rank0: bool, tensorboard_dir: Optional[str] = None,
                 jsonl_path: Optional[str] = None):
        if log_interval < 1:
            raise ValueError(f"logging.log_interval must be >= 1, got {log_interval}")
        self.tags, self.stage, self.total_steps, self.log_interval = frozenset(tags), stage, total_steps, log_interval
        if stage == "grpo":  # declared above, emitted only with their grpo.* / rollout.* switch
            self.tags |= frozenset(GRPO_SWITCH_TAGS)
        self.device, self.is_rank0 = device, is_rank0
        self.jsonl_path = Path(jsonl_path) if jsonl_path and is_rank0 else None
        self.writer = None
        if is_rank0 and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, step: int, metrics: dict[str, float], lr: float) -> dict[str, float]:
        """Adds the learning rate and memory to ``metrics`` (step ``step``, 0-based), writes
        them on rank 0 and returns the full set."""
        metrics = {**metrics, "train/lr": lr, **memory_metrics(self.device)}
        unknown = sorted(set(metrics) - self.tags)
        if unknown:
            raise KeyError(f"metrics {unknown} are not declared in trainer/metrics.py (stage {self.stage})")
        if not self.is_rank0:
            return metrics
        if step % self.log_interval == 0 or step == self.total_steps - 1:
            print(progress_line(self.stage, step, self.total_steps, metrics), flush=True)
        if self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")
        return metrics

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
