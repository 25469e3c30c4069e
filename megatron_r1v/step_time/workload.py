"""What one step does: the model's shapes and the step's work (pure data, no formulas).

A recipe becomes a :class:`Workload` with :func:`workload_from_config` (shapes from the
preset architecture, ``models/r1v/presets.py``; batch, lengths and layout from the run
config); the published runs of ``validation.py`` are written as Workloads directly.
What a recipe does not say (the mean response length, the prompt's text tokens) is an
:class:`Assumptions` field, changed with ``--set assume.<name>=<value>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

from megatron_r1v.models.r1v.presets import DecoderArch, R1VArch


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder (+ optional vision tower and adapter): the numbers the formulas use."""

    name: str
    params: float
    """Decoder parameters, embeddings and output head included."""
    embed_params: float
    """Input-embedding parameters (a lookup: no FLOPs)."""
    layers: int
    hidden: int
    kv_width: int
    """key/value heads x head dim (the KV cache holds 2 x layers x kv_width values per token)."""
    kv_heads: int
    vision_params: float = 0.0
    vision_embed_params: float = 0.0
    vision_layers: int = 0
    vision_hidden: int = 0
    patches_per_tile: int = 0
    tokens_per_tile: int = 0
    """Decoder tokens per tile after the adapter."""
    adapter_params: float = 0.0
    tensors: int = 0
    """Parameter tensors (the per-tensor cost of a full weight sync)."""
    q_width: int = 0
    """Query heads x head dim when it is not ``hidden`` (Qwen3-32B: 8192); 0: hidden."""

    @property
    def attention_width(self) -> int:
        return self.q_width or self.hidden

    @property
    def total_params(self) -> float:
        return self.params + self.vision_params + self.adapter_params


def decoder_spec(name: str, d: DecoderArch) -> ModelSpec:
    """A text-only spec from a preset decoder (its exact parameter count)."""
    return ModelSpec(name, float(d.num_parameters()), float(d.vocab_size * d.hidden_size), d.num_layers,
                     d.hidden_size, d.num_query_groups * d.head_dim, d.num_query_groups,
                     tensors=d.num_layers * 12 + 3)


def arch_spec(name: str, arch: R1VArch) -> ModelSpec:
    """The spec of a preset architecture (``parameter_counts`` is exact)."""
    base = decoder_spec(name, arch.decoder)
    if arch.vision is None:
        return base
    v, counts = arch.vision, arch.parameter_counts()
    embed = v.num_channels * v.patch_size ** 2 * v.hidden_size + 2 * v.hidden_size + v.num_positions * v.hidden_size
    return dataclasses.replace(base, vision_params=float(counts["vision"]), vision_embed_params=float(embed),
                               vision_layers=v.num_layers, vision_hidden=v.hidden_size,
                               patches_per_tile=v.num_positions, tokens_per_tile=arch.tokens_per_tile,
                               adapter_params=float(counts["adapter"]), tensors=base.tensors + v.num_layers * 16 + 8)


@dataclass(frozen=True)
class Layout:
    """Training parallelism: Megatron (tp x pp x cp x dp) or FSDP (dp = every GPU)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int = 1
    """Virtual pipeline chunks per stage (interleaved schedule)."""
    strategy: Literal["megatron", "fsdp"] = "megatron"
    distributed_optimizer: bool = True


@dataclass(frozen=True)
class Rollout:
    """Generation: colocated engines on the training GPUs, or ``gpus`` of their own (async)."""

    tp: int
    mem_fraction: float
    max_running: Optional[int] = None
    kv_tokens: Optional[int] = None
    """KV-cache tokens per engine when known (the memory plan's SGLang pool); else from mem_fraction."""
    gpus: int = 0
    """0: colocated on the training GPUs; > 0: that many rollout GPUs, one step off-policy."""
    prefix_cache: bool = True
    """The n samples of a prompt share its prefill (SGLang radix cache, vLLM prefix caching)."""


@dataclass(frozen=True)
class Workload:
    """One optimizer step (an RL step: rollout + scoring + log-probs + update + sync)."""

    name: str
    model: ModelSpec
    gpus: int
    layout: Layout
    sequences: int
    """Sequences trained per step (prompts x samples for GRPO; 2 x pairs for MPO)."""
    prompt_tokens: float
    response_tokens: float
    """Mean response tokens."""
    max_response_tokens: float
    micro_batch_tokens: float
    tiles_per_sequence: float = 0.0
    rollout: Optional[Rollout] = None
    prompts: int = 0
    """Distinct prompts (prefill is shared across a prompt's samples)."""
    logprob_passes: int = 0
    """Forward-only passes over the batch: old log-probs, reference log-probs."""
    trains: frozenset = frozenset({"language_model", "vision", "adapter"})
    recompute: Optional[str] = None
    fp8: bool = False
    optimizer_steps: int = 1
    """Optimizer steps per step (mini-batches of the same batch; FLOPs are counted once)."""
    train_epochs: int = 1
    """Passes of training over the batch (GRPO's ppo_epochs)."""
    reward_model_params: float = 0.0
    reward_gpus: int = 0
    sync_path: Literal["ipc", "nvlink", "ib", "host"] = "ipc"
    sync_bytes: Optional[float] = None
    """Bytes a weight sync moves per engine GPU; None: the trainable bf16 weights / engine tp."""
    sync_gather: bool = False
    """The trainer gathers whole tensors across its PP / EP ranks first (over the slowest link)."""
    offload_bytes_per_gpu: float = 0.0
    """Parameters / optimizer moved to the host and back between phases (FSDP offload)."""
    checkpoint_bytes: float = 0.0
    checkpoint_interval: int = 0

    @property
    def tokens(self) -> float:
        return self.sequences * (self.prompt_tokens + self.response_tokens)


@dataclass(frozen=True)
class Assumptions:
    """What a recipe does not fix; every value is a stated assumption (``--set assume.x=y``)."""

    mean_response_frac: float = 0.5
    """GRPO mean response = this x rollout.max_new_tokens (R1-style reasoning fills about half)."""
    text_prompt_tokens: float = 300.0
    """Text tokens of a prompt (question + chat template), besides the image tokens."""
    tiles: Optional[float] = None
    """Tiles per prompt image; None: data.max_tiles + 1 (the thumbnail), the memory plan's default."""
    mpo_sequence_frac: float = 0.5
    """MPO mean sequence (prompt + response) = this x train.seq_length."""
    reward_model_params: float = 7.6e9
    """Reward model size when reward.model_weight > 0 (an image-aware 7B-class RM; not in the recipe)."""
    reward_gpus: int = 8
    """GPUs of the reward-model server (one node, outside the training job)."""
    storage_gbps: Optional[float] = None

    def with_overrides(self, changes: dict[str, Any]) -> "Assumptions":
        names = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in names:
                raise ValueError(f"assume.{key}: no such assumption (known: {', '.join(sorted(names))})")
        values = {k: (int(v) if k == "reward_gpus" else float(v)) for k, v in changes.items()}
        return dataclasses.replace(self, **values)
