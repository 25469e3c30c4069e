"""Builds everything one rank of a training run holds, for the stage ``train.stage`` names.

Shared by both stages: the process group and Megatron parallel state, this rank's model
stage (the architecture ``model.checkpoint`` records, with its weights, or ``model.preset``'s,
random; ``trainer/arch.py``), DDP, the optimizer, the tokenizer (which gives the image token
id; it must fit the vocabulary and agree with the checkpoint's record), the chat template
and the tiler (``data.tiler``, built by ``data.tilers.build_tiler`` on one rank per replica
and shared with the rest of it by ``data.replica_tiling``; rank 0 prints a ``tiler: ...`` line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_r1v.config import RunConfig


@dataclass
class _Common:
    ctx: Any
    arch: Any
    stage: Any
    ddp: Any
    optimizer: Any
    tokenizer: Any
    template: Any
    tiler: Any


def _build_common(cfg: RunConfig) -> _Common:
    from megatron_r1v.checkpoint.model_fragments import load_model_checkpoint
    from megatron_r1v.data.replica_tiling import build_replica_tiler
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tiling import TilingConfig
    from megatron_r1v.data.tokenizer import load_tokenizer
    from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT
    from megatron_r1v.platform import init_distributed
    from megatron_r1v.trainer.arch import describe, run_arch
    from megatron_r1v.trainer.schedule import attach_ddp_hooks
    from megatron_r1v.trainer.setup import build_model_stage, build_optimizer, wrap_ddp

    ctx = init_distributed(cfg.parallel, seed=cfg.train.seed)
    # The checkpoint's architecture (or the preset's, randomly initialised) with the
    # tokenizer's <IMG_CONTEXT> id: trainer/arch.py.
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    arch = run_arch(cfg.model, tokenizer, f"data.tokenizer {cfg.data.tokenizer}")
    if arch.vision is None:
        raise ValueError(f"{describe(cfg.model)} has no vision tower; the R1V stages need an R1V architecture")
    stage = build_model_stage(arch, ctx, cfg.model, layout=TRANSFORMERS_LAYOUT,
                              sequence_parallel=cfg.parallel.sequence_parallel,
                              cp_comm_type=cfg.parallel.cp_comm_type)
    if cfg.model.checkpoint:
        load_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx, cfg.model.checkpoint)
    ddp = wrap_ddp(stage.model, stage.config, use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer)
    optimizer = build_optimizer([ddp], cfg.optimizer, cfg.model.params_dtype)
    attach_ddp_hooks(ddp, optimizer)

    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=arch.tokens_per_tile,
                                                      max_seq_len=cfg.train.seq_length,
                                                      chat_template=cfg.data.chat_template))
    tiling = TilingConfig(image_size=arch.vision.image_size, max_tiles=cfg.data.max_tiles,
                          on_bad_sample=cfg.data.on_bad_sample)
    tiler, description = build_replica_tiler(ctx, cfg.data, tiling)
    if ctx.rank == 0:
        print(f"tiler: {description}", flush=True)
        print(f"chat template: {template.format.source}: replies end with {template.format.reply_end!r} "
              f"(id {template.stop_token_id}), thought opened by the prompt: {template.open_think}", flush=True)
    return _Common(ctx, arch, stage, ddp, optimizer, tokenizer, template, tiler)


def sglang_model_dir(cfg: RunConfig) -> str:
    """The HF folder an SGLang engine builds its model, tokenizer and processor from."""
    import os

    from megatron_r1v.checkpoint.conversion import HF_EXTRA_DIR

    if cfg.rollout.model_dir:
        return cfg.rollout.model_dir
    if not cfg.model.checkpoint:
        raise ValueError("rollout.engine=sglang needs rollout.model_dir (an HF folder with config.json and the "
                         "tokenizer) or a model.checkpoint written by tools/convert_checkpoint.py import")
    folder = os.path.join(cfg.model.checkpoint, HF_EXTRA_DIR)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"rollout.engine=sglang: {folder} has no config.json (model.checkpoint was not imported "
                         "from an HF checkpoint); set rollout.model_dir to the HF folder of the model")
    return folder


def build_rollout_engine(cfg: RunConfig, c: _Common, ctx):
    """The rollout engine of this replica (built on its owner rank only): in sync mode in this
    process, colocated on the replica's GPUs; in async mode in a process of its own
    (``rollout/engine_process.py``), on GPUs of its own."""
    if cfg.rollout.mode == "async":
        return _engine_process(cfg, c, ctx)
    if cfg.rollout.engine == "hf":
        from megatron_r1v.rollout.hf_engine import HFRolloutEngine

        return HFRolloutEngine.from_arch(c.arch, tokenizer=c.tokenizer, seed=cfg.train.seed)
    from megatron_r1v.rollout.sglang_engine import SGLangRolloutEngine

    # One engine per TP group, on that group's GPUs (colocated): the owner is the
    # group's first rank, whose local GPU index is where the engine's GPUs start.
    return SGLangRolloutEngine.from_config(cfg.rollout, model_dir=sglang_model_dir(cfg), tp_size=ctx.tp,
                                           base_gpu_id=ctx.device.index or 0, seed=cfg.train.seed,
                                           tokenizer=c.tokenizer)


def _engine_process(cfg: RunConfig, c: _Common, ctx):
    """Async mode: the engine in a child process, built there from picklable arguments; on
    GPUs, the engine's own GPUs start at this rank's + ``rollout.engine_gpu_offset``."""
    import functools
    import os

    from megatron_r1v.rollout.engine_process import EngineProcess

    device = "cpu"
    if ctx.device.type == "cuda":
        import torch

        from megatron_r1v.validation import check_async_engine_gpus

        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
        first = check_async_engine_gpus(cfg.rollout, ctx.device.index or 0, ctx.tp if cfg.rollout.engine == "sglang"
                                        else 1, local_ranks, torch.cuda.device_count())
        device = f"cuda:{first}"
    if cfg.rollout.engine == "hf":
        factory = functools.partial(_hf_engine, c.arch, cfg.data.tokenizer, cfg.train.seed, device)
    else:
        factory = functools.partial(_sglang_engine, cfg.rollout, sglang_model_dir(cfg), ctx.tp,
                                    int(device.split(":")[1]) if ":" in device else 0, cfg.train.seed,
                                    cfg.data.tokenizer)
    engine = EngineProcess(factory, name=f"rollout engine of DP replica {ctx.dp_rank}")
    print(f"rank {ctx.rank}: async rollout: {cfg.rollout.engine} engine in process {engine.pid} on {device}",
          flush=True)
    return engine


def _hf_engine(arch, tokenizer_dir: str, seed: int, device: str):
    """Runs in the engine process: the HF engine of ``arch`` (weights come from the first sync)."""
    from megatron_r1v.data.tokenizer import load_tokenizer
    from megatron_r1v.rollout.hf_engine import HFRolloutEngine

    return HFRolloutEngine.from_arch(arch, tokenizer=load_tokenizer(tokenizer_dir), seed=seed, device=device)


def _sglang_engine(rollout_cfg, model_dir: str, tp_size: int, base_gpu_id: int, seed: int, tokenizer_dir: str):
    """Runs in the engine process: an SGLang engine on GPUs ``base_gpu_id ..`` (never run on a GPU)."""
    from megatron_r1v.data.tokenizer import load_tokenizer
    from megatron_r1v.rollout.sglang_engine import SGLangRolloutEngine

    return SGLangRolloutEngine.from_config(rollout_cfg, model_dir=model_dir, tp_size=tp_size,
                                           base_gpu_id=base_gpu_id, seed=seed, tokenizer=load_tokenizer(tokenizer_dir))


def build_grpo_trainer(cfg: RunConfig):
    from megatron_r1v.data.loader import PromptLoader
    from megatron_r1v.data.replica_tiling import check_images_once
    from megatron_r1v.data.schema import load_records
    from megatron_r1v.rewards.hybrid import HybridReward
    from megatron_r1v.rollout.weight_sync import ENGINE_LAYOUTS, WeightSync
    from megatron_r1v.ssb import SelectiveSampleBuffer
    from megatron_r1v.trainer.grpo import GRPOTrainer

    c = _build_common(cfg)
    ctx = c.ctx
    checked = check_images_once(cfg.data.train_path, "prompts", ctx)  # decoded by the tiling ranks only
    records = load_records(cfg.data.train_path, "prompts", cfg.data.on_bad_sample, checked=checked).records
    loader = PromptLoader(records, c.template, c.tiler, seed=cfg.train.seed, dp_rank=ctx.dp_rank, dp_size=ctx.dp,
                          on_bad_sample=cfg.data.on_bad_sample)
    sync = WeightSync(c.arch, ctx, [c.ddp], shard_spec=c.stage.shard_spec, backend=c.stage.backend,
                      every_dp_replica=True, layout=ENGINE_LAYOUTS[cfg.rollout.engine],
                      bucket_bytes=cfg.rollout.weight_bucket_mb << 20)
    engine = build_rollout_engine(cfg, c, ctx) if sync.is_owner else None
    sync.sync(engine, full=True)  # the engine starts from the trainer's weights
    # The format reward expects the thought opened by the prompt exactly when the template opens it;
    # the reward model judges a reply without the policy's closing token (it renders its own).
    reward = HybridReward.from_config(cfg.reward, think_opened_by_prompt=c.template.open_think,
                                      reply_end=c.template.format.reply_end)
    trainer = GRPOTrainer(cfg, ctx, c.stage, c.ddp, c.optimizer, loader, reward, SelectiveSampleBuffer(cfg.ssb),
                          sync, engine, stop_token_ids=(c.template.stop_token_id,))
    return trainer, ctx


def build_mpo_trainer(cfg: RunConfig, init_layout: Optional[dict] = None):
    from megatron_r1v.data.loader import PairLoader
    from megatron_r1v.data.pairs import load_pairs
    from megatron_r1v.data.replica_tiling import check_images_once
    from megatron_r1v.trainer.mpo import MPOTrainer
    from megatron_r1v.trainer.reference_cache import reference_logprobs

    c = _build_common(cfg)
    ctx = c.ctx
    m = cfg.mpo
    checked = check_images_once(cfg.data.train_path, m.data_format, ctx)  # decoded by the tiling ranks only
    pairs = load_pairs(cfg.data.train_path, m.data_format, m.margin_threshold, m.max_pairs_per_prompt,
                       on_bad_sample=cfg.data.on_bad_sample, checked_images=checked)
    if ctx.rank == 0:
        print(f"MPO pairs: {pairs.summary()}", flush=True)
    loader = PairLoader(pairs.records, c.template, c.tiler, seed=cfg.train.seed, dp_rank=ctx.dp_rank,
                        dp_size=ctx.dp, on_bad_sample=cfg.data.on_bad_sample)
    # Before any optimizer step (and before --resume loads trained weights): the
    # reference policy is the model as it starts.
    reference = reference_logprobs(cfg, ctx, c.ddp, loader, init_layout)
    return MPOTrainer(cfg, ctx, c.stage, c.ddp, c.optimizer, loader, reference), ctx


def build_sft_trainer(cfg: RunConfig):
    from megatron_r1v.data.loader import SFTLoader
    from megatron_r1v.data.replica_tiling import check_images_once
    from megatron_r1v.data.schema import load_records
    from megatron_r1v.trainer.sft import SFTTrainer

    c = _build_common(cfg)
    ctx = c.ctx
    checked = check_images_once(cfg.data.train_path, "sft", ctx)  # decoded by the tiling ranks only
    loaded = load_records(cfg.data.train_path, "sft", cfg.data.on_bad_sample, checked=checked)
    loader = SFTLoader(loaded.records, c.template, c.tiler, seed=cfg.train.seed, dp_rank=ctx.dp_rank,
                       dp_size=ctx.dp, on_bad_sample=cfg.data.on_bad_sample)
    if ctx.rank == 0:
        per_step, n = cfg.sft.samples_per_step, len(loaded.records)
        print(f"SFT conversations: {n} ({loaded.skipped} skipped); {cfg.train.steps} steps x {per_step} = "
              f"{cfg.train.steps * per_step / n:.2f} epochs", flush=True)
    return SFTTrainer(cfg, ctx, c.stage, c.ddp, c.optimizer, loader), ctx


def build_trainer(cfg: RunConfig, init_layout: Optional[dict] = None):
    """(trainer, parallel context) for ``cfg.train.stage``. ``init_layout``: the TP/PP at which
    a resumed run's random initial weights were drawn (MPO's reference log-probs cache key)."""
    if cfg.train.stage == "mpo":
        return build_mpo_trainer(cfg, init_layout)
    return {"sft": build_sft_trainer, "grpo": build_grpo_trainer}[cfg.train.stage](cfg)
