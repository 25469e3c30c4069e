"""Every check of a run's configuration, in one place, before anything is built.

Two passes, each error a ``ValueError`` naming its key (``section.field``):

- :func:`validate_config`: values and how they fit together (ranges, the architecture and
  the parallel layout, the stage's own constraints; the architecture is the checkpoint's
  record when it is on this machine, else ``model.preset``: ``trainer/arch.py``).
  :func:`megatron_r1v.config.load_config` runs it, so a recipe or ``--set`` with a bad
  value fails before any process starts (``python -m megatron_r1v.config`` shows the same
  errors).
- :func:`preflight`: what the chosen stage needs from this machine and the file system:
  the inputs it names (data, tokenizer, checkpoint, SGLang model folder) exist, the
  backend, dtype and parallel settings can run here (CUDA, Transformer Engine, SGLang,
  DALI for ``data.tiler=dali``),
  a reward-model server the GRPO stage uses answers its health check, and the architecture
  the run builds is known (``model.checkpoint``'s record, agreeing with a ``model.preset``
  given with it, or the preset) and divides over the parallel layout.
  ``python -m megatron_r1v.train`` runs it on every rank before distributed init.

Components built from a config (the SSB, the hybrid reward, the model stage) call the
checks of their section from here, so a component built by hand is checked the same way.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from megatron_r1v.config import (
        DataConfig,
        GRPOConfig,
        LoggingConfig,
        ModelConfig,
        MPOConfig,
        OptimizerConfig,
        ParallelConfig,
        RewardConfig,
        RolloutConfig,
        RunConfig,
        SFTConfig,
        SSBConfig,
    )


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:  # "not >=" also rejects NaN
        raise ValueError(f"{key} must be >= {low:g}, got {value}")


def _above(key: str, value: float, low: float) -> None:
    if not value > low:
        raise ValueError(f"{key} must be > {low:g}, got {value}")


def _within(key: str, value: float, low: float, high: float, *, open_low: bool = False,
            open_high: bool = False) -> None:
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        raise ValueError(f"{key} must be in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}, "
                         f"got {value}")


def validate_config(cfg: "RunConfig") -> "RunConfig":
    """Checks every value of ``cfg`` and how they fit together; returns it (module docstring)."""
    _check_parallel(cfg.parallel)
    _check_context_parallel(cfg)
    _check_model(cfg.model, cfg.parallel)
    _check_optimizer(cfg.optimizer, cfg.train.steps)
    _at_least("train.steps", cfg.train.steps, 1)
    _at_least("train.seq_length", cfg.train.seq_length, 1)
    _at_least("train.save_interval", cfg.train.save_interval, 0)
    _at_least("train.keep_last", cfg.train.keep_last, 0)
    check_data_config(cfg.data)
    _check_rollout(cfg.rollout, greedy_ok=cfg.train.stage != "grpo")
    # the server URL is a preflight matter
    check_reward_config(cfg.reward, has_scorer=True, max_new_tokens=cfg.rollout.max_new_tokens)
    check_ssb_config(cfg.ssb)
    _check_grpo(cfg.grpo, cfg.train.seq_length if cfg.train.stage == "grpo" else None, cfg.ssb)
    _check_rollout_mode(cfg)
    _check_mpo(cfg.mpo, cfg.train.seq_length if cfg.train.stage == "mpo" else None)
    _check_sft(cfg.sft, cfg.train.seq_length if cfg.train.stage == "sft" else None)
    _check_logging(cfg.logging)
    return cfg


def _check_parallel(p: "ParallelConfig") -> None:
    for name in ("tp", "pp", "cp"):
        _at_least(f"parallel.{name}", getattr(p, name), 1)
    if p.sequence_parallel and p.tp == 1:
        raise ValueError("parallel.sequence_parallel needs parallel.tp > 1")
    _at_least("parallel.timeout_minutes", p.timeout_minutes, 1)
    if p.cp_comm_type not in CP_COMM_TYPES:
        raise ValueError(f"parallel.cp_comm_type must be one of {CP_COMM_TYPES}, got {p.cp_comm_type!r}")


CP_COMM_TYPES = ("p2p", "all_gather", "a2a")


def _check_context_parallel(cfg: "RunConfig") -> None:
    """``parallel.cp`` > 1: Transformer Engine's attention, and token budgets that hold the
    2*cp padding of every sample (``models.r1v.context_parallel``)."""
    from megatron_r1v.models.r1v.context_parallel import cp_token_multiple, padded_length

    p = cfg.parallel
    if p.cp == 1:
        return
    if cfg.model.backend == "local":
        raise ValueError(f"parallel.cp={p.cp} needs Transformer Engine's attention: set model.backend=te (or auto "
                         "on a GPU with Transformer Engine); the local backend has no context parallelism")
    multiple = cp_token_multiple(p.cp, p.tp, p.sequence_parallel)
    stage = cfg.train.stage
    if stage == "grpo" and cfg.grpo.importance_level == "sequence":
        # GSPO's ratio averages over whole responses, which CP ranks hold in parts (trainer/grpo_step.py
        # would need those per-response sums over the CP group): refused rather than silently per-part.
        raise ValueError(f"grpo.importance_level=sequence is not supported with parallel.cp={p.cp} yet; "
                         "use grpo.importance_level=token or parallel.cp=1")
    budget = {"grpo": cfg.grpo, "mpo": cfg.mpo, "sft": cfg.sft}[stage].micro_batch_tokens
    what = f"parallel.cp={p.cp} pads every sample to a multiple of {multiple} (2*cp" + (
        "*tp with parallel.sequence_parallel)" if p.sequence_parallel else ")")
    if p.pp > 1 and budget % multiple:
        raise ValueError(f"{stage}.micro_batch_tokens ({budget}) must be a multiple of {multiple} with "
                         f"parallel.pp > 1: {what} and pipeline stages exchange rows of one length")
    per_row = 2 if stage == "mpo" else 1  # an MPO row holds a pair
    need = per_row * padded_length(cfg.train.seq_length, multiple)
    if budget < need:
        raise ValueError(f"{stage}.micro_batch_tokens ({budget}) must be >= {need}: {what}, and a row must hold "
                         f"{'a pair of' if per_row == 2 else 'one'} train.seq_length={cfg.train.seq_length} sample(s)")


def check_context_parallel_arch(arch, p: "ParallelConfig") -> None:
    """``parallel.cp_comm_type=a2a`` scatters attention heads over the CP ranks: the heads and
    query groups of one TP rank must divide by ``parallel.cp``."""
    if p.cp == 1 or p.cp_comm_type != "a2a":
        return
    heads, groups = arch.decoder.num_attention_heads // p.tp, arch.decoder.num_query_groups // p.tp
    if heads % p.cp or groups % p.cp:
        raise ValueError(f"parallel.cp_comm_type=a2a: the {heads} attention heads and {groups} query groups per TP "
                         f"rank must divide by parallel.cp={p.cp} (use cp_comm_type p2p)")


def _check_model(m: "ModelConfig", p: "ParallelConfig") -> None:
    from megatron_r1v.trainer.arch import describe, has_checkpoint_record, resolve_arch

    # The architecture as far as the config tells here (the checkpoint's record when it is on
    # this machine, else the preset); the preflight requires one (trainer/arch.py).
    if m.preset is not None or has_checkpoint_record(m):
        arch = resolve_arch(m, missing_checkpoint_ok=True)
        arch.check_parallel(p.tp, p.pp, where=describe(m))
        check_context_parallel_arch(arch, p)
    _at_least("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by, 1)
    _at_least("model.vocab_pad_tp", m.vocab_pad_tp, 1)
    _at_least("model.recompute_num_layers", m.recompute_num_layers, 1)
    check_fp8(m.fp8)


def check_fp8(fp8, backend: Optional[str] = None) -> None:
    """The ``model.fp8.*`` values; with the resolved layer ``backend``, that FP8 can run on it."""
    from megatron_r1v.models.r1v.spec import FP8_FORMATS, FP8_RECIPES

    if fp8 is None:
        return
    _at_least("model.fp8.amax_history_len", fp8.amax_history_len, 1)
    _at_least("model.fp8.margin", fp8.margin, 0)
    if fp8.recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8.recipe must be one of {tuple(FP8_RECIPES)}, got {fp8.recipe!r}")
    if fp8.format is None:
        return
    if fp8.format not in FP8_FORMATS:
        raise ValueError(f"model.fp8.format must be one of {FP8_FORMATS}, got {fp8.format!r}")
    if backend is not None and backend != "te":
        raise ValueError(f"model.fp8.format={fp8.format} needs Transformer Engine layers, but the backend is "
                         f"{backend!r} (set model.backend=te on a GPU with the [gpu] extra, or model.fp8.format=null)")


def _check_optimizer(o: "OptimizerConfig", steps: int) -> None:
    _at_least("optimizer.lr", o.lr, 0.0)
    if not 0 <= o.min_lr <= o.lr:
        raise ValueError(f"optimizer.min_lr ({o.min_lr}) must be in [0, optimizer.lr={o.lr}]")
    if not 0 <= o.lr_warmup_steps < max(steps, 1):
        raise ValueError(f"optimizer.lr_warmup_steps ({o.lr_warmup_steps}) must be in [0, train.steps={steps})")
    _at_least("optimizer.weight_decay", o.weight_decay, 0.0)
    _within("optimizer.adam_beta1", o.adam_beta1, 0.0, 1.0, open_high=True)
    _within("optimizer.adam_beta2", o.adam_beta2, 0.0, 1.0, open_high=True)
    _above("optimizer.adam_eps", o.adam_eps, 0.0)
    _at_least("optimizer.clip_grad", o.clip_grad, 0.0)


TILERS = ("auto", "dali", "pil")
BAD_SAMPLE_POLICIES = ("error", "skip")


def check_data_config(d: "DataConfig") -> None:
    """The ``data.*`` values (``data.tilers.build_tiler`` runs it too, for a config built by hand)."""
    _at_least("data.max_tiles", d.max_tiles, 1)
    if d.tiler not in TILERS:
        raise ValueError(f"data.tiler must be one of {', '.join(TILERS)}, got {d.tiler!r}")
    if isinstance(d.tiler_threads, bool) or not isinstance(d.tiler_threads, int):
        raise ValueError(f"data.tiler_threads must be an integer >= 1, got {d.tiler_threads!r}")
    _at_least("data.tiler_threads", d.tiler_threads, 1)
    if d.on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"data.on_bad_sample must be one of {', '.join(BAD_SAMPLE_POLICIES)}, "
                         f"got {d.on_bad_sample!r}")
    from megatron_r1v.data.chat_format import CHAT_TEMPLATE_CHOICES

    if d.chat_template not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"data.chat_template must be one of {', '.join(CHAT_TEMPLATE_CHOICES)}, "
                         f"got {d.chat_template!r}")


def _check_rollout(r: "RolloutConfig", greedy_ok: bool) -> None:
    # Eq. 6 normalizes a reward by its group's standard deviation: a group needs 2 responses.
    _at_least("rollout.n_samples", r.n_samples, 2)
    if greedy_ok:
        _at_least("rollout.temperature", r.temperature, 0.0)
    elif not r.temperature > 0:
        raise ValueError(f"rollout.temperature must be > 0 for GRPO (the ratio of Eq. 8 needs sampling "
                         f"log-probs), got {r.temperature}")
    _within("rollout.top_p", r.top_p, 0.0, 1.0, open_low=True)
    _at_least("rollout.max_new_tokens", r.max_new_tokens, 1)
    if r.tis_cap is not None:
        _at_least("rollout.tis_cap", r.tis_cap, 1.0)
    _within("rollout.mem_fraction_static", r.mem_fraction_static, 0.0, 1.0, open_low=True, open_high=True)
    _at_least("rollout.weight_bucket_mb", r.weight_bucket_mb, 1)
    if r.max_running_requests is not None:
        _at_least("rollout.max_running_requests", r.max_running_requests, 1)


def check_reward_config(config: "RewardConfig", has_scorer: bool = False,
                        max_new_tokens: Optional[int] = None) -> None:
    """The ``reward.*`` values; without a scorer, a reward-model weight needs the server's URL.
    ``max_new_tokens`` (``rollout.max_new_tokens``, the overlong punishment's L_max) bounds
    ``reward.overlong_buffer_tokens`` when given."""
    from megatron_r1v.rewards.hybrid import CALIBRATIONS

    for name in ("rule_weight", "format_weight", "model_weight", "model_threshold"):
        value = getattr(config, name)
        if not math.isfinite(value):
            raise ValueError(f"reward.{name} must be finite, got {value}")
    if config.model_calibration not in CALIBRATIONS:
        raise ValueError(f"reward.model_calibration: {config.model_calibration!r} is not one of "
                         f"{', '.join(CALIBRATIONS)}")
    if config.model_weight != 0 and not has_scorer and not config.reward_model_url:
        raise ValueError(f"reward.model_weight={config.model_weight:g} needs reward.reward_model_url "
                         "(start a server with tools/serve_reward_model.py) or set reward.model_weight=0")
    _above("reward.model_timeout_s", config.model_timeout_s, 0.0)
    _at_least("reward.model_retry_s", config.model_retry_s, 0.0)
    _at_least("reward.model_backoff_s", config.model_backoff_s, 0.0)
    _at_least("reward.model_batch_size", config.model_batch_size, 1)
    if config.model_image_transport not in ("path", "base64"):
        raise ValueError(f"reward.model_image_transport: {config.model_image_transport!r} is not one of path, base64")
    _check_overlong(config, max_new_tokens)


def _check_overlong(config: "RewardConfig", max_new_tokens: Optional[int]) -> None:
    """DAPO's overlong punishment: 0 <= reward.overlong_buffer_tokens < rollout.max_new_tokens, a finite weight >= 0."""
    buffer = config.overlong_buffer_tokens
    if isinstance(buffer, bool) or not isinstance(buffer, int):
        raise ValueError(f"reward.overlong_buffer_tokens must be an integer number of tokens, got {buffer!r}")
    _at_least("reward.overlong_buffer_tokens", buffer, 0)
    if max_new_tokens is not None and buffer >= max_new_tokens:
        raise ValueError(f"reward.overlong_buffer_tokens must be < rollout.max_new_tokens={max_new_tokens} "
                         f"(the punishment starts at max_new_tokens - buffer), got {buffer}")
    weight = config.overlong_penalty_weight
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"reward.overlong_penalty_weight must be finite and >= 0, got {weight}")


def check_ssb_config(config: "SSBConfig") -> None:
    """The ``ssb.*`` values."""
    _at_least("ssb.capacity", config.capacity, 1)
    _at_least("ssb.max_age", config.max_age, 0)
    _within("ssb.target_effective_ratio", config.target_effective_ratio, 0.0, 1.0)
    if config.max_reuse < 0:
        raise ValueError(f"ssb.max_reuse must be >= 0 (0: no limit), got {config.max_reuse}")
    _check_min_reward_std(config.min_reward_std)
    if config.initial_store is not None and not (isinstance(config.initial_store, str) and config.initial_store):
        raise ValueError(f"ssb.initial_store must be a store folder or null, got {config.initial_store!r}")
    if config.initial_store is not None and not config.enabled:
        raise ValueError("ssb.initial_store needs ssb.enabled true (a disabled buffer never reuses its groups)")


def _check_min_reward_std(value: object) -> None:
    """``ssb.min_reward_std``: "auto" or a finite number >= 0 (a bool is not a number here)."""
    if isinstance(value, str) and value == "auto":
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value >= 0):
        raise ValueError(f"ssb.min_reward_std must be 'auto' or a finite number >= 0 (0: only exactly flat groups "
                         f"are ineffective), got {value!r}")


def _check_grpo(g: "GRPOConfig", seq_length: Optional[int], ssb: Optional["SSBConfig"] = None) -> None:
    _check_grpo_switches(g, ssb)
    _at_least("grpo.prompts_per_step", g.prompts_per_step, 1)
    _within("grpo.clip_low", g.clip_low, 0.0, 1.0, open_high=True)
    _at_least("grpo.clip_high", g.clip_high, 0.0)
    _at_least("grpo.kl_beta", g.kl_beta, 0.0)
    if g.clip_ratio_c is not None:
        _above("grpo.clip_ratio_c", g.clip_ratio_c, 1.0)
    if g.normalization_constant is not None:
        _at_least("grpo.normalization_constant", g.normalization_constant, 1)
    _at_least("grpo.micro_batch_tokens", g.micro_batch_tokens, 1)
    _at_least("grpo.ppo_epochs", g.ppo_epochs, 1)
    if seq_length is not None and g.micro_batch_tokens < seq_length:
        raise ValueError(f"grpo.micro_batch_tokens ({g.micro_batch_tokens}) must be >= train.seq_length "
                         f"({seq_length}): a sample must fit one micro-batch")


def _check_grpo_switches(g: "GRPOConfig", ssb: Optional["SSBConfig"]) -> None:
    """``grpo.kl_placement`` and ``grpo.dynamic_sampling`` with the keys they depend on."""
    if g.kl_placement not in ("loss", "reward"):  # a config built in code skips the loader's Literal check
        raise ValueError(f"grpo.kl_placement must be 'loss' or 'reward', got {g.kl_placement!r}")
    if g.kl_placement == "reward" and not g.kl_beta > 0:
        raise ValueError(f"grpo.kl_placement=reward needs grpo.kl_beta > 0 (the KL penalty's weight in the "
                         f"reward), got grpo.kl_beta={g.kl_beta}")
    _at_least("grpo.dynamic_sampling_max_rounds", g.dynamic_sampling_max_rounds, 1)
    if g.dynamic_sampling and ssb is not None and ssb.enabled and ssb.target_effective_ratio > 0:
        raise ValueError("grpo.dynamic_sampling=true and the SSB top-up (ssb.enabled=true with "
                         f"ssb.target_effective_ratio={ssb.target_effective_ratio:g}) are alternatives for the same "
                         "ablation: set ssb.enabled=false (or ssb.target_effective_ratio=0), or grpo.dynamic_sampling"
                         "=false")


def _check_rollout_mode(cfg: "RunConfig") -> None:
    """``rollout.mode`` and ``rollout.engine_gpu_offset``; async rollout against the switches it cannot serve."""
    r = cfg.rollout
    if r.mode not in ("sync", "async"):  # a config built in code skips the loader's Literal check
        raise ValueError(f"rollout.mode must be 'sync' or 'async', got {r.mode!r}")
    if isinstance(r.engine_gpu_offset, bool) or not isinstance(r.engine_gpu_offset, int):
        raise ValueError(f"rollout.engine_gpu_offset must be an integer >= 0, got {r.engine_gpu_offset!r}")
    _at_least("rollout.engine_gpu_offset", r.engine_gpu_offset, 0)
    if r.mode == "async" and cfg.grpo.dynamic_sampling:
        raise ValueError("rollout.mode=async and grpo.dynamic_sampling=true: dynamic sampling's extra rounds "
                         "sample from the current policy while step k trains from the previous one's; use "
                         "rollout.mode=sync for dynamic sampling, or grpo.dynamic_sampling=false")


def check_async_engine_gpus(rollout: "RolloutConfig", local_gpu: int, engine_gpus: int, local_ranks: int,
                            visible_gpus: int) -> int:
    """The first GPU of an async engine whose owner trains on local GPU ``local_gpu``: the
    engines get GPUs of their own (``rollout.engine_gpu_offset``) on the owner's node."""
    first = local_gpu + rollout.engine_gpu_offset
    if rollout.engine_gpu_offset < local_ranks:
        raise ValueError(f"rollout.mode=async on GPUs: rollout.engine_gpu_offset={rollout.engine_gpu_offset} puts "
                         f"the engine on GPUs the {local_ranks} trainer ranks of this node use; set it to at least "
                         f"{local_ranks} (the engines get the node's GPUs after the trainer's)")
    if first + engine_gpus > visible_gpus:
        raise ValueError(f"rollout.mode=async: the engine of the replica on local GPU {local_gpu} needs GPUs "
                         f"{first}..{first + engine_gpus - 1} (rollout.engine_gpu_offset="
                         f"{rollout.engine_gpu_offset}), but this node has {visible_gpus}")
    return first


def _check_mpo(m: "MPOConfig", seq_length: Optional[int]) -> None:
    _at_least("mpo.pairs_per_step", m.pairs_per_step, 1)
    _at_least("mpo.max_pairs_per_prompt", m.max_pairs_per_prompt, 0)
    _above("mpo.beta", m.beta, 0.0)
    for name in ("preference_weight", "quality_weight", "generation_weight"):
        _at_least(f"mpo.{name}", getattr(m, name), 0.0)
    from megatron_r1v.losses.mpo import BCO_DELTAS, NLL_NORMALIZATIONS

    # A config built in code skips the YAML loader's Literal check.
    if m.bco_delta not in BCO_DELTAS:
        raise ValueError(f"mpo.bco_delta must be one of {', '.join(BCO_DELTAS)}, got {m.bco_delta!r}")
    if m.nll_normalization not in NLL_NORMALIZATIONS:
        raise ValueError(f"mpo.nll_normalization must be one of {', '.join(NLL_NORMALIZATIONS)}, "
                         f"got {m.nll_normalization!r}")
    _at_least("mpo.micro_batch_tokens", m.micro_batch_tokens, 2)
    if seq_length is None:
        return
    if m.micro_batch_tokens < 2 * seq_length:
        raise ValueError(f"mpo.micro_batch_tokens ({m.micro_batch_tokens}) must be >= 2 * train.seq_length "
                         f"({2 * seq_length}): a pair's two sequences share a micro-batch")
    if m.data_format == "scored" and m.margin_threshold is None:
        raise ValueError("mpo.margin_threshold must be set with mpo.data_format=scored (the report uses 7, 10 or 15)")


def _check_sft(s: "SFTConfig", seq_length: Optional[int]) -> None:
    _at_least("sft.samples_per_step", s.samples_per_step, 1)
    _at_least("sft.micro_batch_tokens", s.micro_batch_tokens, 1)
    if seq_length is not None and s.micro_batch_tokens < seq_length:
        raise ValueError(f"sft.micro_batch_tokens ({s.micro_batch_tokens}) must be >= train.seq_length "
                         f"({seq_length}): a conversation must fit one micro-batch")


def _check_logging(log: "LoggingConfig") -> None:
    _at_least("logging.log_interval", log.log_interval, 1)


# --- preflight: this machine and the file system ----------------------------------------


def preflight(cfg: "RunConfig") -> None:
    """What the chosen stage needs here, each error naming its key (module docstring)."""
    _check_inputs(cfg)
    _check_tiler_installed(cfg.data)
    check_model_on_machine(cfg.model, cfg.parallel, device_type=_device_type())
    if cfg.train.stage == "grpo":
        check_reward_config(cfg.reward, max_new_tokens=cfg.rollout.max_new_tokens)
        if cfg.rollout.engine == "sglang":
            _check_sglang(cfg)
        _check_reward_server(cfg.reward)
    _check_architecture(cfg)


def _check_architecture(cfg: "RunConfig") -> None:
    """The architecture the run builds exists: the checkpoint's record (agreeing with a
    preset given with it) or a preset, and divides over the parallel layout."""
    from megatron_r1v.trainer.arch import describe, resolve_arch

    resolve_arch(cfg.model).check_parallel(cfg.parallel.tp, cfg.parallel.pp, where=describe(cfg.model))


def _check_reward_server(reward: "RewardConfig") -> None:
    """The reward-model server answers GET /health (rank 0 only: one request per job, not
    one per GPU), retried within ``reward.model_retry_s`` like every request, so a server
    still starting up is waited for, each attempt logged."""
    if reward.model_weight == 0 or not reward.reward_model_url or int(os.environ.get("RANK", "0")) != 0:
        return
    from megatron_r1v.rewards.reward_model import RewardModelClient, RewardServerError

    try:
        RewardModelClient.from_config(reward).health()
    except RewardServerError as err:
        raise ValueError(f"reward.reward_model_url: {err}") from None


def _device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_inputs(cfg: "RunConfig") -> None:
    """The files and folders the run reads exist."""
    for key, value in (("data.train_path", cfg.data.train_path), ("data.tokenizer", cfg.data.tokenizer)):
        if not value:
            raise ValueError(f"{key} must be set for the {cfg.train.stage} stage")
    if not os.path.isfile(cfg.data.train_path):
        raise ValueError(f"data.train_path: {cfg.data.train_path} is not a file")
    if not os.path.isdir(cfg.data.tokenizer):
        raise ValueError(f"data.tokenizer: {cfg.data.tokenizer} is not a folder")
    if cfg.model.checkpoint and not os.path.isdir(cfg.model.checkpoint):
        raise ValueError(f"model.checkpoint: {cfg.model.checkpoint} is not a folder")
    if cfg.rollout.model_dir and not os.path.isdir(cfg.rollout.model_dir):
        raise ValueError(f"rollout.model_dir: {cfg.rollout.model_dir} is not a folder")


def _check_tiler_installed(data: "DataConfig") -> None:
    """``data.tiler=dali`` needs DALI here. Only whether it is installed: building the operator
    is left to the tiling ranks (``data.tilers.build_tiler``), which agree on its outcome."""
    if data.tiler != "dali":
        return
    try:
        found = importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace package at all
        found = False
    if not found:
        raise ValueError("data.tiler=dali: NVIDIA DALI is not installed (pip install 'megatron-r1v[data]', "
                         "which brings nvidia-dali-cuda120); set data.tiler=auto or pil to tile with PIL")


def check_model_on_machine(model: "ModelConfig", parallel: "ParallelConfig", device_type: str) -> str:
    """The layer backend ``model.backend`` resolves to on this machine, after the settings
    that depend on it (dtype, FP8, sequence and context parallelism) were checked."""
    from megatron_r1v.models.r1v.spec import resolve_backend

    backend = resolve_backend(model.backend, cuda_available=device_type == "cuda")
    if device_type == "cpu" and model.params_dtype != "fp32":
        raise ValueError(f"model.params_dtype={model.params_dtype}: the CPU mode runs fp32 only")
    if parallel.sequence_parallel and backend != "te":
        raise ValueError("parallel.sequence_parallel needs Transformer Engine layers (model.backend=te)")
    if device_type == "cpu" and parallel.cp != 1:
        raise ValueError(f"parallel.cp={parallel.cp}: context parallelism needs CUDA; use cp=1 on CPU")
    if device_type == "cuda" and parallel.cp != 1 and backend != "te":
        raise ValueError(f"parallel.cp={parallel.cp} needs Transformer Engine's attention, but model.backend="
                         f"{model.backend} resolved to {backend!r} (set model.backend=te with the [gpu] extra)")
    check_fp8(model.fp8, backend)
    return backend


def _check_sglang(cfg: "RunConfig") -> None:
    import torch

    from megatron_r1v.trainer.build import sglang_model_dir

    sglang_model_dir(cfg)  # on every rank, before any collective: only owners build engines
    if not torch.cuda.is_available():
        raise ValueError("rollout.engine=sglang runs SGLang engines on the training GPUs and needs CUDA; "
                         "use rollout.engine=hf on a machine without GPUs")
    from megatron_r1v.rollout.sglang_engine import ROLLOUT_EXTRA

    if importlib.util.find_spec("sglang") is None:
        raise ValueError(f"rollout.engine=sglang: sglang is not installed ({ROLLOUT_EXTRA}, or use the "
                         "docker/Dockerfile image)")
    from megatron_r1v.trainer.arch import check_rollout_folder, describe, resolve_arch

    check_rollout_folder(sglang_model_dir(cfg), resolve_arch(cfg.model), describe(cfg.model))
