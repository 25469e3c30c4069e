"""Builds real model stages and measures what the memory planner predicts (one JSON per rank).

    torchrun --nproc_per_node N plan_memory_worker.py --tp T --pp P --cases cases.json --out DIR

Each case is {"preset", "freeze", "distributed_optimizer", "meta"}. A meta case builds
the stage on the meta device and records parameter names and sizes only. Otherwise the
stage is built for real (CPU, fp32), wrapped in Megatron DDP, given Megatron's optimizer,
and stepped once with zero gradients so that Adam allocates its state; the worker then
records this rank's parameter numels, which parameters got an fp32 ``main_grad``, and
the bytes of the optimizer's state tensors and fp32 master copies.
"""

import argparse
import json
import os

import torch

from megatron_r1v.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_r1v.models.r1v.hf_mapping import QWEN2_LAYOUT, TRANSFORMERS_LAYOUT
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.platform import destroy_distributed, init_distributed
from megatron_r1v.trainer.setup import build_model_stage, build_optimizer, wrap_ddp


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def optimizer_bytes(optimizer) -> tuple[int, int]:
    """(Adam state bytes without the step counters, fp32 master-copy bytes) of this rank."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    state = master = 0
    for opt in parts:
        for per_param in opt.optimizer.state.values():
            state += _tensor_bytes(t for k, t in per_param.items() if k != "step" and torch.is_tensor(t))
        for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            for group in getattr(opt, name, []):
                master += _tensor_bytes(group)
    return state, master


def measure(case: dict, ctx) -> dict:
    arch = get_preset(case["preset"])
    layout = TRANSFORMERS_LAYOUT if arch.vision is not None else QWEN2_LAYOUT
    model_cfg = ModelConfig(preset=case["preset"], backend="local", freeze=case["freeze"])
    if case.get("meta"):
        with torch.device("meta"):
            stage = build_model_stage(arch, ctx, model_cfg, layout=layout, meta_device=True)
        params = dict(stage.model.named_parameters())
        return {"numels": {n: p.numel() for n, p in params.items()},
                "weights": _tensor_bytes(params.values()),
                "trainable": sum(p.numel() for p in params.values() if p.requires_grad)}
    stage = build_model_stage(arch, ctx, model_cfg, layout=layout)
    ddp = wrap_ddp(stage.model, stage.config, use_distributed_optimizer=case["distributed_optimizer"])
    optimizer = build_optimizer([ddp], OptimizerConfig(use_distributed_optimizer=case["distributed_optimizer"]),
                                "fp32")
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()
    params = dict(stage.model.named_parameters())
    state, master = optimizer_bytes(optimizer)
    return {
        "numels": {n: p.numel() for n, p in params.items()},
        "weights": _tensor_bytes(params.values()),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "main_grad_bytes": _tensor_bytes(p.main_grad for p in params.values() if p.requires_grad),
        "main_grad_dtypes": sorted({str(p.main_grad.dtype) for p in params.values() if p.requires_grad}),
        "frozen_with_main_grad": [n for n, p in params.items()
                                  if not p.requires_grad and getattr(p, "main_grad", None) is not None],
        "grad_buffer_numel_unpadded": sum(b.numel_unpadded for b in ddp.buffers),
        "optimizer_state_bytes": state,
        "master_bytes": master,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp), force_cpu=True)
    cases = json.load(open(args.cases))
    report = {"tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank, "dp": ctx.dp,
              "cases": [measure(case, ctx) for case in cases]}
    with open(os.path.join(args.out, f"rank{ctx.rank}.json"), "w") as f:
        json.dump(report, f)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
