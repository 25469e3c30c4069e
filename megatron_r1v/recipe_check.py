"""Checks a cluster recipe on one CPU process: the real model stages of an N-GPU job, built on
the meta device.

A 64-GPU recipe cannot be launched here, but every rank's model stage can be built as
that rank would build it: a fake process group (``torch.testing``'s ``fake`` backend,
whose collectives do nothing) gives this process the rank and world size of the job,
Megatron-Core's parallel state is initialized on it for the recipe's TP/PP, and
``build_model_stage`` runs under ``torch.device("meta")`` (shapes only, nothing
allocated), for the architecture the run builds (``memory_plan.planned_arch``: the
checkpoint's record, or ``model.preset`` where the record is not on this machine). What
this proves: that architecture divides over the recipe's TP and PP (heads,
query groups, layers, vocabulary padding), the stage of each pipeline rank builds, and
its parameter counts; :func:`check_recipe` compares those counts with the memory plan's.

Substitutions, because Transformer Engine needs CUDA: the stages are built with the
local Megatron-Core layers and without FP8 and sequence parallelism. Parameter shapes and
dtypes are the same as TE's (TE fuses the norms into the next linear layer: same tensors,
other names).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_r1v.config import RunConfig
from megatron_r1v.platform import LaunchEnv, ParallelContext, context_from_parallel_state, data_parallel_size


@contextmanager
def simulated_rank(cfg: RunConfig, world_size: int, rank: int) -> Iterator[ParallelContext]:
    """This process as rank ``rank`` of a ``world_size`` job with ``cfg.parallel`` (fake
    collectives, meta device). Process-global state: one at a time, never inside a real job."""
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("simulated_rank needs a process without a process group")
    par = cfg.parallel
    data_parallel_size(world_size, par.tp, par.pp, par.cp)  # raises when the layout does not divide
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        # Megatron's extra gloo groups would need a real gloo backend.
        parallel_state.initialize_model_parallel(par.tp, par.pp, context_parallel_size=par.cp,
                                                 create_gloo_process_groups=False)
        env = LaunchEnv.from_environ({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                                      "LOCAL_RANK": str(rank % 8), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
        yield context_from_parallel_state(par, env, torch.device("meta"), "fake")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def stage_parameter_bytes(cfg: RunConfig, world_size: int, rank: int) -> dict:
    """Builds rank ``rank``'s model stage on the meta device; returns its parameter counts
    and bytes: ``params``, ``trainable``, ``weight_bytes``, ``trainable_bytes`` and the
    rank's ``tp_rank`` / ``pp_rank``."""
    from megatron_r1v.memory_plan import planned_arch
    from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT
    from megatron_r1v.trainer.setup import build_model_stage

    model_cfg = dataclasses.replace(cfg.model, backend="local", fp8=dataclasses.replace(cfg.model.fp8, format=None))
    with simulated_rank(cfg, world_size, rank) as ctx:
        with torch.device("meta"):
            stage = build_model_stage(planned_arch(cfg), ctx, model_cfg, layout=TRANSFORMERS_LAYOUT,
                                      meta_device=True)
        params = list(stage.model.parameters())
        trainable = [p for p in params if p.requires_grad]
        return {
            "rank": rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank,
            "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        }


def main(argv=None) -> int:
    """``python -m megatron_r1v.recipe_check --config X [--set k=v] --gpus N --rank R``: one JSON
    line of :func:`stage_parameter_bytes` (tools/check_recipe.py runs one per pipeline stage)."""
    from megatron_r1v.config import add_config_args, load_config

    parser = argparse.ArgumentParser(description=main.__doc__)
    add_config_args(parser)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(stage_parameter_bytes(load_config(args.config, args.overrides), args.gpus, args.rank)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
