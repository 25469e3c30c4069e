"""Typed run configuration: dataclasses, YAML recipes and ``--set a.b=c`` overrides.

A run is described by one :class:`RunConfig`. Recipes are YAML files whose nesting
mirrors the dataclasses; any key can then be overridden on the command line with
``--set section.field=value`` (the value is parsed as YAML, so ``1e-5``, ``true`` and
``[1, 2]`` keep their types). Unknown keys and values of the wrong type are errors
that name the key's full path, e.g. ``unknown config key 'train.stpes'``.

The string literal under each field is its documentation (shown by
``python -m megatron_r1v.config --help-fields``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

DType = Literal["fp32", "bf16", "fp16"]


@dataclass
class FP8Config:
    format: Optional[Literal["hybrid", "e4m3"]] = None
    """FP8 format of Transformer Engine GEMMs (hybrid: e4m3 forward, e5m2 backward); null disables FP8."""
    recipe: Literal["delayed", "current"] = "delayed"
    """Scaling: delayed (amax history) or current (per-tensor, from the live tensor)."""
    amax_history_len: int = 1024
    """Length of the amax history window (delayed scaling)."""
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    """How the scale is computed from the amax history: its maximum, or its most recent entry."""
    margin: int = 0
    """Scaling-factor margin, as a power of two."""


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    """Architecture preset name (megatron_r1v/models/r1v/presets.py): required to initialise randomly;
    optional with model.checkpoint, whose recorded architecture is built (a preset must then agree)."""
    backend: Literal["auto", "local", "te"] = "auto"
    """Layer implementation: Transformer Engine ("te"), Megatron-Core local modules
    ("local"), or "auto" (TE when it is installed and CUDA is present)."""
    params_dtype: DType = "fp32"
    """Dtype of model parameters (bf16 on GPU; fp32 on CPU)."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this times lcm(TP, vocab_pad_tp) (never exported)."""
    vocab_pad_tp: int = 8
    """Pad the vocabulary for this TP as well, so checkpoints reshard between TP sizes dividing it."""
    freeze: Literal["adapter", "adapter+llm", "adapter+vision", "all"] = "adapter"
    """Which parts train (the name lists them): the report's best setting trains the adapter only."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 Transformer Engine recipe (GPU only)."""
    checkpoint: Optional[str] = None
    """Megatron checkpoint to start from (``tools/convert_checkpoint.py import``); its architecture and image
    token id are the run's; None: random init of model.preset."""
    recompute_granularity: Optional[Literal["selective", "full"]] = None
    """Activation recomputation of the decoder and vision blocks: selective (core attention only),
    full (whole layers, see recompute_method), or null (keep every activation)."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """With full recomputation: uniform (checkpoint groups of recompute_num_layers layers) or block
    (recompute only the first recompute_num_layers layers of each pipeline stage)."""
    recompute_num_layers: int = 1
    """Layers per recomputed group (uniform) or recomputed layers per stage (block)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size: each packed row is split over cp ranks for long responses
    (models/r1v/context_parallel.py). cp > 1 needs CUDA and Transformer Engine's attention
    (model.backend te or auto on a GPU with TE); every sample is padded to a multiple of 2*cp
    (2*cp*tp with sequence_parallel), and with pp > 1 the stage's micro_batch_tokens must be a
    multiple of that. Must be 1 on CPU."""
    cp_comm_type: Literal["p2p", "all_gather", "a2a"] = "p2p"
    """How TE's attention exchanges keys and values between CP ranks: p2p (ring, overlapped with
    compute), all_gather, or a2a (Ulysses-style; needs the attention heads and query groups per TP
    rank divisible by cp)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    timeout_minutes: int = 30
    """Timeout of collective operations."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (lr_decay_style linear or cosine)."""
    lr_warmup_steps: int = 0
    """Training steps of linear warm-up from 0 to lr."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after the warm-up: constant, or decaying to min_lr at train.steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.95
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's denominator epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."""


@dataclass
class TrainConfig:
    stage: Literal["sft", "mpo", "grpo"] = "grpo"
    """Training stage run by ``python -m megatron_r1v.train``."""
    seed: int = 1234
    """Seed of weight initialization, data order and rollout sampling."""
    steps: int = 10
    """Optimizer steps to run."""
    seq_length: int = 2048
    """Maximum tokens per sample (prompt + response)."""
    save_dir: Optional[str] = None
    """Directory of training checkpoints; None disables saving."""
    save_interval: int = 0
    """Save every N steps (0: only at the end); ``--resume`` continues from the newest one in save_dir."""
    keep_last: int = 0
    """Keep only the N newest checkpoints in save_dir, deleting older ones after a newer one is
    complete (0: keep every checkpoint)."""


@dataclass
class DataConfig:
    train_path: Optional[str] = None
    """JSON Lines file of training prompts (grpo), preference pairs or scored responses (mpo), or
    conversations (sft); schemas in megatron_r1v/data/schema.py."""
    max_tiles: int = 12
    """Maximum dynamic tiles per image (a thumbnail is added when more than one)."""
    tokenizer: Optional[str] = None
    """Hugging Face tokenizer folder (``python -m megatron_r1v.data.tokenizer`` builds one for tiny models)."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """A record whose images cannot be read or whose prompt is too long: stop with an error
    naming it, or skip it with a warning."""
    tiler: Literal["auto", "dali", "pil"] = "auto"
    """Image tiling backend (data/tilers.py): dali (NVIDIA DALI's CPU pipeline with the project's
    r1v.internvl_tiles operator, bit-identical to pil and ~5x its images/s), pil (the PIL reference),
    or auto (dali when DALI is installed and the operator builds, else pil with one warning saying
    why). One rank per replica tiles (the first TP rank of the first pipeline stage); its TP peers
    receive the tiles, later pipeline stages only the tile counts."""
    chat_template: str = "auto"
    """Turn markers of the prompts and conversations (data/chat_format.py): auto reads them from the
    tokenizer's chat_template (QwQ's <|im_start|> turns, R1-Distill's <｜User｜> / <｜Assistant｜>, ...;
    the qwq family's when it has none), or a family's: qwq, qwen2.5, r1-distill."""
    tiler_threads: int = 2
    """Worker threads of the tiler on each tiling rank. 2 is what docs/benchmarks.md measures and
    what a 2-core CPU run can give it; on a GPU node, where one rank per replica tiles for its
    TP peers, raise it to the cores those ranks leave free (e.g. 8-16 per replica)."""


@dataclass
class RolloutConfig:
    engine: Literal["hf", "sglang"] = "hf"
    """Rollout engine: the transformers one (CPU and small GPU runs) or SGLang colocated on the GPUs."""
    n_samples: int = 8
    """Samples generated per prompt (the GRPO group size, >= 2: Eq. 6 divides by the group's std)."""
    temperature: float = 1.0
    """Sampling temperature (> 0 for GRPO); log-probs are those of softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 1024
    """Most tokens generated per response."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling: weight each token of a fresh response's GRPO loss by
    min(pi_old / pi_engine, tis_cap), correcting the gap between the trainer's and the rollout
    engine's log-probs of the sampled tokens; null turns the correction off in sync mode (the
    gap is still logged as rollout/logprob_abs_diff) and means 2.0 in async mode, where the
    engine samples from the policy one step back and the correction is always on."""
    mode: Literal["sync", "async"] = "sync"
    """sync: each step generates its responses from its own weights, then trains. async
    (one-step-off, trainer/grpo_async.py): step k+1's responses are generated by an engine in
    a process of its own, from the weights before step k's update, while step k trains; the
    ratio is taken against the trainer's log-probs before the update and each token weighted by
    min(pi_old / pi_engine, tis_cap) (the engine's log-probs are the behaviour policy's).
    Not with grpo.dynamic_sampling. On GPUs the engines need their own GPUs (engine_gpu_offset)."""
    engine_gpu_offset: int = 0
    """async on GPUs: a replica's engine runs on the node's GPUs from (its first rank's local GPU
    + this), e.g. 4 on 8-GPU nodes training on GPUs 0-3; must be at least the trainer ranks per
    node. Unused in sync mode (engines colocated) and on CPU."""

    ASYNC_DEFAULT_TIS_CAP = 2.0

    @property
    def effective_tis_cap(self) -> Optional[float]:
        """The TIS cap the loss applies: ``tis_cap``, or in async mode 2.0 when it is null."""
        if self.tis_cap is None and self.mode == "async":
            return self.ASYNC_DEFAULT_TIS_CAP
        return self.tis_cap
    model_dir: Optional[str] = None
    """SGLang: HF folder the engine reads config, tokenizer and processor from (weights come from the
    trainer); null: the hf_extra/ folder of model.checkpoint."""
    mem_fraction_static: float = 0.35
    """SGLang: fraction of GPU memory for the engine's weights and KV cache (colocated with training)."""
    weight_bucket_mb: int = 512
    """Size of the flattened buckets in which weights stream from the trainer into the engine."""
    max_running_requests: Optional[int] = None
    """SGLang: cap on concurrently decoded sequences (null: SGLang's default from the KV cache size)."""
    deterministic: bool = False
    """SGLang: start the engines with enable_deterministic_inference, under which SGLang honours the
    per-sample seeds the adapter sends and its kernels are batch-invariant, so a prompt's samples
    do not depend on which replica or batch generates them: a GRPO run resumed at another DP size
    then samples what the uninterrupted run did. Slower decoding; off by default. The HF engine
    samples so whenever the requests carry streams, as the GRPO trainer's do (a random stream per
    sample, keyed by the prompt's position in the step)."""


@dataclass
class RewardConfig:
    rule_weight: float = 1.0
    """Weight of r_rule (1 when the final \\boxed{} answer is right, else 0) in the hybrid reward (Eq. 7)."""
    format_weight: float = 1.0
    """Weight of r_format (1 for <think>...</think> followed by a \\boxed{} answer, else 0) in Eq. 7."""
    model_weight: float = 0.0
    """Weight of the calibrated reward-model score r_theta in Eq. 7; 0 turns the reward model off."""
    reward_model_url: Optional[str] = None
    """Base URL of a reward-model server (tools/serve_reward_model.py), e.g. http://127.0.0.1:8000."""
    model_calibration: Literal["none", "clip", "sigmoid", "step"] = "none"
    """How the raw reward-model score s becomes r_theta, with t = model_threshold: none: s;
    clip: min(s, t); sigmoid: 1/(1+exp(-(s-t))); step: 1 if s >= t else 0."""
    model_threshold: float = 0.0
    """Calibration threshold t of model_calibration (unused by "none")."""
    model_timeout_s: float = 60.0
    """Timeout of one request to the reward-model server."""
    model_retry_s: float = 300.0
    """Time budget for retrying a failed request (connection error, timeout, HTTP 5xx), each
    attempt logged, before the run stops with a checkpoint and an error. 300 s outlasts a
    restart of tools/serve_reward_model.py with a 7-8B reward model (loading its weights
    from local disk takes 1-3 minutes); 0 disables retries."""
    model_backoff_s: float = 1.0
    """Sleep before the first retry; it doubles at each further retry (at most 30 s)."""
    model_batch_size: int = 32
    """Items (prompt, response, images) per request to the reward-model server."""
    model_image_transport: Literal["path", "base64"] = "path"
    """How the prompts' images reach the reward-model server: path: their absolute paths (the
    server reads them from a filesystem it shares with the trainer); base64: the files' bytes
    in the request (a server on another machine)."""
    overlong_buffer_tokens: int = 0
    """DAPO's soft overlong punishment (Eq. 13; rewards/overlong.py): the buffer L_cache, in
    tokens, below the response budget L_max = rollout.max_new_tokens. A response of |y|
    generated tokens (stop token included) gets 0 up to L_max - L_cache, then a linear
    (L_max - L_cache - |y|) / L_cache down to -1 at L_max, -1 beyond, times
    overlong_penalty_weight, added to the reward of Eq. 7. 0 turns it off; must be < rollout.max_new_tokens."""
    overlong_penalty_weight: float = 1.0
    """Weight of the overlong punishment in the total reward (unused when overlong_buffer_tokens is 0)."""


@dataclass
class SSBConfig:
    enabled: bool = True
    """Keep a Selective Sample Buffer (R1V2 section 3.3) and top GRPO batches up from it."""
    capacity: int = 4096
    """Maximum number of stored groups over all data-parallel ranks (the lowest priority is
    evicted first, the same groups at any DP size)."""
    max_age: int = 8
    """Groups older than this many steps are dropped."""
    target_effective_ratio: float = 1.0
    """Replace ineffective groups of a batch (see min_reward_std) with buffered ones until this
    share of the batch's groups is effective (0: no reuse)."""
    min_reward_std: Union[float, Literal["auto"]] = "auto"
    """The effective-group criterion: a group of G responses is effective when its total rewards
    (Eq. 7) are not all equal and their unbiased std is >= this; other groups get zero advantages
    (Eq. 6), so they add no std-amplified noise to the loss, are not buffered, are the ones the
    top-up replaces, and count as ineffective in ssb/effective_ratio_*. Applies with
    ssb.enabled false too, so an SSB ablation compares the same advantages. 0: only exactly flat
    groups (the rule-only behaviour). Why a reward std and not a minimum |A|: Eq. 6 divides by the
    std, so |A| is the same for a spread of 1e-3 as for one of 1 and cannot tell noise from
    signal. auto resolves (ssb.policy.resolve_min_reward_std) to 0 when the reward is discrete
    (reward.model_weight 0, or model_calibration step: rule, format and stepped model terms
    differ by whole weights or not at all); with a continuous reward-model term to the std of
    0.2 logits of reward-model score in reward units, |model_weight| x 0.2 (none, clip) or
    |model_weight| x 0.05 (sigmoid, whose steepest slope is 1/4): under Bradley-Terry a score
    spread that small means pairwise preferences near 57/43, within a reward model's noise.
    auto is capped at half the std that one response differing by the smallest non-zero
    rule/format weight w gives in a group of G (w / (2 sqrt(G))), so a lone right answer is
    never dropped. 0.2 logits is a starting point (the report gives no value): ablate it."""
    max_reuse: int = 0
    """A buffered group leaves the buffer once it has been drawn this many times (0: no limit)."""
    seed: int = 0
    """Seed of the buffer's weighted draws; a resumed run keeps the seed and draw counter of its checkpoint."""
    initial_store: Optional[str] = None
    """An SSB store written by ``python -m megatron_r1v.ssb.prompt_pool --ssb-store DIR`` (null: the
    buffer starts empty). A fresh run starts with its groups in the buffer: saved as one shard,
    they are split over the data-parallel ranks round-robin in uid order (``ssb.persist.load``),
    at most ``capacity`` kept over all ranks. They count as generated at step 0 (by the initial
    policy, which is the pool's model), so they age out after ``max_age`` steps like step 0's
    rollouts, and pass the buffer's checks (effective at this run's ``min_reward_std``, no
    duplicates, capacity). The store must fit the run (tokenizer, chat template, tokens per tile,
    ``data.max_tiles``, ``rollout.n_samples``, ``rollout.temperature``: its old log-probs are the
    pool engine's at that temperature); a resume ignores it (the checkpoint holds the buffer)."""


@dataclass
class GRPOConfig:
    prompts_per_step: int = 8
    """Prompts rolled out per optimizer step over all data-parallel ranks (x rollout.n_samples responses)."""
    clip_low: float = 0.2
    """Ratio clipped below at 1 - clip_low (Eq. 8)."""
    clip_high: float = 0.2
    """Ratio clipped above at 1 + clip_high."""
    kl_beta: float = 0.0
    """Weight of the KL penalty (estimator: kl_estimator) to the initial policy (0: no reference pass)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL(pi || pi_ref) estimator per token, x = log(pi_ref / pi) (Schulman 2020): k1 = -x, k2 = x^2 / 2,
    k3 = exp(x) - x - 1 (the report's; the fused kernel's). x is clamped to +-20 before each (as the kernel
    clamps its log-ratios: fp32 exp overflows at 88.7; outside the clamp a token's KL has no gradient).
    k1 and k2 run the loss in torch on the kernel's log-probs (losses/grpo_variants.py)."""
    clip_ratio_c: Optional[float] = None
    """Dual clip (Ye et al. 2020; verl's clip_ratio_c, typically 3): the loss of a token with a negative
    advantage is capped at -A clip_ratio_c, bounding what a stale SSB group's large ratio can do; > 1;
    null: off (the fused kernel)."""
    importance_level: Literal["token", "sequence"] = "token"
    """Importance ratio of Eq. 8: token (per-token pi / pi_old) or sequence (GSPO, Zheng et al. 2025:
    exp(mean over the response of log pi / pi_old), clipped once per response; GSPO uses clip ranges
    near 3e-4 / 4e-4, not 0.2)."""
    advantage_std_normalize: bool = True
    """Eq. 6 divides by the group's reward std; false: Dr. GRPO's A = r - mean(r) (Liu et al. 2025)."""
    normalization: Literal["sequence", "token", "constant"] = "sequence"
    """Per-response then per-group mean (Eq. 8), a mean over all response tokens, or constant: Dr. GRPO's
    1 / normalization_constant in place of 1 / |o_i| (then the mean over responses)."""
    normalization_constant: Optional[int] = None
    """The length normalizer of normalization constant (>= 1); null: rollout.max_new_tokens."""
    micro_batch_tokens: int = 4096
    """Token budget of one packed micro-batch (first-fit decreasing); >= train.seq_length."""
    ppo_epochs: int = 1
    """Optimizer steps per rollout batch, each over all its micro-batches (old log-probs stay fixed)."""
    kl_placement: Literal["loss", "reward"] = "loss"
    """Where kl_beta's KL to the initial policy enters: loss, Eq. 8's per-token beta KL term (the report's);
    reward, verl's use_kl_in_reward (InstructGPT's KL-shaped reward): each fresh response's reward becomes
    r - kl_beta sum_t KL_t (policy before the update vs reference, estimator kl_estimator, log-ratio clamped
    to +-20 as in the loss), Eq. 6's advantages and the effective-group criterion use the shaped rewards,
    and the loss has no KL term. Costs a forward pass of the policy and one of the reference over the
    fresh responses before the advantages. Reused SSB groups keep their stored advantages. Needs
    kl_beta > 0; logs train/kl_penalty (mean beta sum_t KL_t per response; train/kl is then the fresh
    tokens' mean KL). losses/kl_reward.py."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, Sec. 3.2), an alternative to the SSB
    top-up for its ablation: groups that fail the effective-group criterion (ssb.min_reward_std, on the
    task rewards: kl_placement reward shapes them after the rounds) are dropped after each rollout round
    and another prompts_per_step prompts are drawn and rolled out until prompts_per_step effective groups
    are collected over all data-parallel ranks, or dynamic_sampling_max_rounds rounds were run (then the
    step trains on what it has and says so). A
    surplus of the last round is cut evenly over the DP ranks (trainer/grpo_batch.dynamic_sampling_quota);
    a rank left with no group keeps its first one (zero advantages) so that it can run the schedule. The
    data cursor advances by every prompt drawn. Excludes the SSB top-up: needs ssb.enabled false or
    ssb.target_effective_ratio 0. Logs dynamic_sampling/rounds and dynamic_sampling/kept_fraction
    (kept / drawn groups)."""
    dynamic_sampling_max_rounds: int = 3
    """Rollout rounds per step at most with dynamic_sampling (>= 1), each of prompts_per_step prompts."""


@dataclass
class MPOConfig:
    data_format: Literal["preferences", "scored"] = "preferences"
    """data.train_path holds ready-made preference pairs, or scored responses to build pairs from
    (``python -m megatron_r1v.data.pairs`` documents both)."""
    margin_threshold: Optional[float] = None
    """Keep pairs whose reward margin (chosen - rejected score) exceeds this (the report compares
    7, 10 and 15); null keeps every ready-made pair. Required for data_format scored."""
    max_pairs_per_prompt: int = 1
    """Pairs built from one prompt's scored responses (0: every rejected candidate)."""
    pairs_per_step: int = 16
    """Preference pairs per optimizer step over all data-parallel ranks."""
    beta: float = 0.1
    """Scale of the implicit reward r = beta log(pi / pi_ref) (Eq. 3-4)."""
    preference_weight: float = 0.8
    """w_p of Eq. 2: the DPO term (Eq. 3). 0.8 / 0.2 / 1.0 are InternVL's MPO recipe values
    (``--sigmoid_loss_weight 0.8 --bco_pair_loss_weight 0.2 --rpo_alpha 1``); the R1V2 report gives none."""
    quality_weight: float = 0.2
    """w_q of Eq. 2: the BCO term (Eq. 4); InternVL's value."""
    generation_weight: float = 1.0
    """w_g of Eq. 2: the chosen response's NLL (Eq. 5); InternVL's value."""
    bco_delta: Literal["running_mean", "trl_running_mean", "zero"] = "running_mean"
    """BCO's delta (Eq. 4): running_mean, the mean implicit reward of all earlier steps (ours);
    trl_running_mean, of earlier steps and this one (TRL <= 0.28 folds the batch in before the
    loss; here the batch is the whole step, over micro-batches and DP ranks, read by an extra
    forward-only pass per step); zero (TRL >= 0.29). losses/mpo.py has the details."""
    nll_normalization: Literal["pair", "token"] = "pair"
    """Eq. 5's NLL: pair, each pair's NLL over its chosen length, averaged (ours, Eq. 5 as printed);
    token, the step's summed chosen NLL over its chosen tokens (TRL's cross-entropy token mean,
    with the whole step, over micro-batches and DP ranks, as the batch)."""
    micro_batch_tokens: int = 4096
    """Token budget of one packed micro-batch; a pair's two sequences share a micro-batch (>= 2 x train.seq_length)."""
    reference_cache: Optional[str] = None
    """Directory of the cached reference log-probs (computed once with the initial policy);
    null: <train.save_dir>/reference_logprobs, or no cache without save_dir."""


@dataclass
class SFTConfig:
    samples_per_step: int = 16
    """Conversations per optimizer step over all data-parallel ranks (a multiple of the DP size);
    the loss is the mean over every assistant token of the step. train.steps sets the length of
    the run: the data is visited in a new permutation each epoch, as many epochs as the steps need."""
    micro_batch_tokens: int = 4096
    """Token budget of one packed micro-batch (whole conversations, first-fit decreasing);
    >= train.seq_length."""


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None
    """Folder of the TensorBoard event files (rank 0); null: no TensorBoard."""
    log_interval: int = 1
    """Print the progress line every N steps (and at the last step); TensorBoard gets every step."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ssb: SSBConfig = field(default_factory=SSBConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    mpo: MPOConfig = field(default_factory=MPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> "RunConfig":
        """Every value and cross-field check (``megatron_r1v.validation.validate_config``);
        raises ValueError naming the key."""
        from megatron_r1v.validation import validate_config

        return validate_config(self)


# --- generic dataclass <-> plain data -------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_EXPONENT_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it converted."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"config key '{path}': {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"config key '{path}': {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{path}': expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key '{path}': expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key '{path}': expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{path}': expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads "1e-5" as a string: it wants "1.0e-5"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key '{path}': expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key '{path}': expected str, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"config key '{path}': unsupported annotation {_type_name(tp)}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Builds dataclass ``cls`` from nested plain data, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ValueError(f"unknown config key '{key_path}' (valid keys here: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], key_path)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def apply_override(data: dict, override: str) -> None:
    """Applies one ``a.b=c`` override to nested plain data in place."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ValueError(f"override {override!r}: empty key in {dotted!r}")
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {override!r}: '{'.'.join(keys[: i + 1])}' is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Loads a YAML recipe (or the defaults), applies overrides, validates."""
    data = to_dict(RunConfig())
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: top level must be a mapping, got {type(loaded).__name__}")
        # Unknown keys are checked against the recipe as written, before merging defaults.
        from_dict(RunConfig, loaded)
        _merge(data, loaded)
    for override in overrides or []:
        apply_override(data, override)
    return from_dict(RunConfig, data).validate()


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe (examples/configs/*.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set parallel.tp=2 (repeatable)",
    )


def field_docs(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(path, type, doc) for every leaf field, read from the string under each field."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    rows = []
    for f, tp in typing.get_type_hints(cls).items():
        path = f"{prefix}{f}"
        if dataclasses.is_dataclass(tp):
            rows += field_docs(tp, path + ".")
        else:
            rows.append((path, _type_name(tp), docs.get(f, "")))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Print a resolved run configuration as YAML.")
    add_config_args(parser)
    parser.add_argument("--help-fields", action="store_true", help="list every key with its type and doc")
    args = parser.parse_args(argv)
    if args.help_fields:
        for path, tp, doc in field_docs():
            print(f"{path:40s} {tp:28s} {doc}")
        return 0
    try:
        config = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
