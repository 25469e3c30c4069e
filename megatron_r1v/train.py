"""Training entry point: ``torchrun --nproc_per_node N -m megatron_r1v.train --config RECIPE [--set a.b=c]``.

Runs the GRPO stage (``train.stage: grpo``; the MPO stage arrives with its own issue):
builds this rank's model stage (from ``model.checkpoint``, a Megatron checkpoint written
by ``tools/convert_checkpoint.py import``, or random weights), the optimizer, the data
loader, the hybrid reward, the Selective Sample Buffer, and one rollout engine per
data-parallel replica; then prints one progress line per step and writes the
TensorBoard scalars of :data:`megatron_r1v.trainer.grpo.TAGS` under
``logging.tensorboard_dir``. With ``train.save_dir`` it writes a training checkpoint
every ``train.save_interval`` steps and at the end (``trainer/checkpoint.py``);
``--resume`` continues from the newest one there, exactly as the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from megatron_r1v.config import RunConfig, add_config_args, load_config


def preflight(cfg: RunConfig) -> None:
    """Settings the GRPO stage needs, each error naming its key."""
    if cfg.train.stage != "grpo":
        raise ValueError(f"train.stage: {cfg.train.stage!r} is not runnable yet; only 'grpo' is implemented")
    for key, value in (("data.train_path", cfg.data.train_path), ("data.tokenizer", cfg.data.tokenizer)):
        if not value:
            raise ValueError(f"{key} must be set for the GRPO stage")
    if cfg.grpo.micro_batch_tokens < cfg.train.seq_length:
        raise ValueError(f"grpo.micro_batch_tokens ({cfg.grpo.micro_batch_tokens}) must be >= train.seq_length "
                         f"({cfg.train.seq_length}): a sample must fit one micro-batch")
    if cfg.grpo.ppo_epochs < 1:
        raise ValueError(f"grpo.ppo_epochs must be >= 1, got {cfg.grpo.ppo_epochs}")
    if cfg.rollout.engine != "hf":
        raise ValueError(f"rollout.engine: {cfg.rollout.engine!r} needs GPU rollout engines; only 'hf' runs here")


def build_trainer(cfg: RunConfig):
    """Everything a GRPO run holds on this rank; returns (trainer, ctx)."""
    from transformers import AutoTokenizer

    from megatron_r1v.data.loader import PromptLoader
    from megatron_r1v.data.schema import load_records
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tiling import PILTiler, TilingConfig
    from megatron_r1v.data.tokenizer import IM_END
    from megatron_r1v.models.r1v.checkpoint_layout import load_model_checkpoint
    from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT
    from megatron_r1v.models.r1v.presets import get_preset
    from megatron_r1v.platform import init_distributed
    from megatron_r1v.rewards.hybrid import HybridReward
    from megatron_r1v.rollout.hf_engine import HFRolloutEngine
    from megatron_r1v.rollout.weight_sync import WeightSync
    from megatron_r1v.ssb import SelectiveSampleBuffer
    from megatron_r1v.trainer.grpo import GRPOTrainer
    from megatron_r1v.trainer.lm_step import attach_ddp_hooks
    from megatron_r1v.trainer.setup import build_model_stage, build_optimizer, wrap_ddp

    ctx = init_distributed(cfg.parallel, seed=cfg.train.seed)
    arch = get_preset(cfg.model.preset)
    if arch.vision is None:
        raise ValueError(f"model.preset {cfg.model.preset!r} has no vision tower; GRPO needs an R1V preset")
    stage = build_model_stage(arch, ctx, cfg.model, layout=TRANSFORMERS_LAYOUT,
                              sequence_parallel=cfg.parallel.sequence_parallel)
    if cfg.model.checkpoint:
        load_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx, cfg.model.checkpoint)
    ddp = wrap_ddp(stage.model, stage.config, use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer)
    optimizer = build_optimizer([ddp], cfg.optimizer, cfg.model.params_dtype)
    attach_ddp_hooks(ddp, optimizer)

    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    if len(tokenizer) > arch.decoder.vocab_size:
        raise ValueError(f"data.tokenizer has {len(tokenizer)} tokens; model.preset {cfg.model.preset!r} has "
                         f"{arch.decoder.vocab_size}")
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=arch.tokens_per_tile,
                                                      max_seq_len=cfg.train.seq_length))
    if template.image_token_id != arch.image_token_id:
        raise ValueError(f"data.tokenizer's <IMG_CONTEXT> is id {template.image_token_id}; model.preset "
                         f"{cfg.model.preset!r} expects {arch.image_token_id}")
    tiler = PILTiler(TilingConfig(image_size=arch.vision.image_size, max_tiles=cfg.data.max_tiles,
                                  on_bad_sample=cfg.data.on_bad_sample))
    records = load_records(cfg.data.train_path, "prompts", cfg.data.on_bad_sample).records
    loader = PromptLoader(records, template, tiler, seed=cfg.train.seed, dp_rank=ctx.dp_rank, dp_size=ctx.dp,
                          on_bad_sample=cfg.data.on_bad_sample)
    sync = WeightSync(arch, ctx, [ddp], shard_spec=stage.shard_spec, backend=stage.backend, every_dp_replica=True)
    engine = HFRolloutEngine.from_arch(arch, tokenizer=tokenizer, seed=cfg.train.seed) if sync.is_owner else None
    sync.sync(engine, full=True)  # the engine starts from the trainer's weights
    trainer = GRPOTrainer(cfg, ctx, stage, ddp, optimizer, loader, HybridReward.from_config(cfg.reward),
                          SelectiveSampleBuffer(cfg.ssb), sync, engine,
                          stop_token_ids=(tokenizer.convert_tokens_to_ids(IM_END),))
    return trainer, ctx


def progress_line(step: int, total: int, metrics: dict) -> str:
    return (f"step {step + 1}/{total} | reward {metrics['train/reward_mean']:.3f} | "
            f"accuracy {metrics['train/accuracy']:.3f} | effective ratio {metrics['ssb/effective_ratio_fresh']:.2f}"
            f" -> {metrics['ssb/effective_ratio_batch']:.2f} | loss {metrics['train/grpo_loss']:+.3e} | "
            f"step time {metrics['perf/step_time_s']:.1f}s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--metrics-jsonl", help="also append each step's metrics to this file (rank 0)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in train.save_dir (an error when there is none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from megatron_r1v.platform import destroy_distributed

    if args.resume and not cfg.train.save_dir:
        print("error: --resume needs train.save_dir", file=sys.stderr)
        return 2
    from megatron_r1v.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    trainer, ctx = build_trainer(cfg)
    start = 0
    if args.resume:
        latest = latest_checkpoint(cfg.train.save_dir)
        if latest is None:
            destroy_distributed(ctx)
            print(f"error: --resume: no checkpoint in {cfg.train.save_dir}", file=sys.stderr)
            return 2
        start = load_checkpoint(latest, trainer, ctx)
        if ctx.rank == 0:
            print(f"resumed from {latest} after step {start}", flush=True)
    writer = None
    if ctx.rank == 0 and cfg.logging.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(cfg.logging.tensorboard_dir)
    try:
        for step in range(start, cfg.train.steps):
            metrics = trainer.step(step)
            done = step + 1
            interval = cfg.train.save_interval
            if cfg.train.save_dir and ((interval and done % interval == 0) or done == cfg.train.steps):
                save_checkpoint(cfg.train.save_dir, done, trainer, ctx)
            if ctx.rank != 0:
                continue
            if step % cfg.logging.log_interval == 0 or step == cfg.train.steps - 1:
                print(progress_line(step, cfg.train.steps, metrics), flush=True)
            if writer is not None:
                for tag, value in metrics.items():
                    writer.add_scalar(tag, value, step)
                writer.flush()
            if args.metrics_jsonl:
                with open(args.metrics_jsonl, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
    finally:
        if writer is not None:
            writer.close()
        destroy_distributed(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
