"""Shared by the step workers: the tiny Qwen2 from its HF weights as this rank's Megatron
stage (all parameters trainable) under DDP, and the worker's common arguments."""

import argparse

from safetensors import safe_open

from megatron_r1v.checkpoint.weights import load_hf_weights
from megatron_r1v.config import ModelConfig, ParallelConfig
from megatron_r1v.models.r1v.hf_mapping import QWEN2_LAYOUT
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.platform import init_distributed
from megatron_r1v.trainer.schedule import attach_ddp_hooks
from megatron_r1v.trainer.setup import build_model_stage, wrap_ddp


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-file", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def tiny_qwen2_ddp(args: argparse.Namespace):
    """(ctx, stage, ddp) for the layout in ``args``."""
    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    stage = build_model_stage(get_preset("tiny-qwen2"), ctx, ModelConfig(preset="tiny-qwen2", backend="local",
                                                                         freeze="all"), layout=QWEN2_LAYOUT)
    with safe_open(args.hf_file, framework="pt") as reader:
        load_hf_weights(stage.model, stage.stage_maps, stage.shard_spec, ctx, reader.get_tensor)
    ddp = wrap_ddp(stage.model, stage.config)
    attach_ddp_hooks(ddp)
    return ctx, stage, ddp
