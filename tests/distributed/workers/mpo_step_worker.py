"""torchrun worker: one MPO forward/backward of packed preference pairs on a TP/PP/DP layout.

Loads the tiny Qwen2 weights, packs this DP rank's share of the pairs (every dp-th pair,
a pair's two sequences in one row) into fixed-length rows, runs ``mpo_forward_backward``
under Megatron DDP, and writes the step's metrics and the DP-reduced gradients under HF
names (rank 0).
"""

import argparse
import dataclasses
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_r1v.config import ModelConfig, ParallelConfig
from megatron_r1v.data.packing import pack_samples
from megatron_r1v.data.template import EncodedSample
from megatron_r1v.losses.mpo import MPOConfig
from megatron_r1v.models.r1v.hf_mapping import QWEN2_LAYOUT
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.models.r1v.weights import gather_hf_tensors, load_hf_weights
from megatron_r1v.platform import destroy_distributed, init_distributed
from megatron_r1v.trainer.lm_step import attach_ddp_hooks
from megatron_r1v.trainer.mpo_step import make_mpo_microbatch, mpo_forward_backward
from megatron_r1v.trainer.setup import build_model_stage, wrap_ddp

BUDGET = 48


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-file", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    stage = build_model_stage(get_preset("tiny-qwen2"), ctx, ModelConfig(preset="tiny-qwen2", backend="local",
                                                                         freeze="all"), layout=QWEN2_LAYOUT)
    with safe_open(args.hf_file, framework="pt") as reader:
        load_hf_weights(stage.model, stage.stage_maps, stage.shard_spec, ctx, reader.get_tensor)
    ddp = wrap_ddp(stage.model, stage.config)
    attach_ddp_hooks(ddp)

    cases = torch.load(args.cases)
    pairs = cases["pairs"]
    mine = list(range(ctx.dp_rank, len(pairs), ctx.dp))
    encoded = []
    for i in mine:
        for side in ("chosen", "rejected"):
            encoded.append(EncodedSample(f"{i}{side[0]}", pairs[i][side]["tokens"], pairs[i][side]["labels"], 0, (), 0))
    groups = [[2 * k, 2 * k + 1] for k in range(len(mine))]
    packed = pack_samples(encoded, [None] * len(encoded), BUDGET, pad_id=0, pad_to_multiple=BUDGET, groups=groups)
    microbatches = []
    for mb in packed:
        row = {s: pos for pos, s in enumerate(mb.sample_indices)}
        local_pairs = sorted({s // 2 for s in mb.sample_indices})
        microbatches.append(make_mpo_microbatch(
            mb, [(row[2 * k], row[2 * k + 1]) for k in local_pairs],
            [pairs[mine[k]]["ref_chosen"] for k in local_pairs], [pairs[mine[k]]["ref_rejected"] for k in local_pairs]))
    ddp.zero_grad_buffer()
    result = mpo_forward_backward(ddp, microbatches, ctx, MPOConfig(**cases["config"]), cases["delta"], len(pairs))
    grads = gather_hf_tensors(ddp, stage.stage_maps, stage.shard_spec, ctx, grads=True)
    if ctx.rank == 0:
        save_file({k: v.contiguous() for k, v in grads.items()}, os.path.join(args.out, "grads.safetensors"))
        json.dump({**dataclasses.asdict(result), "microbatches": len(microbatches)},
                  open(os.path.join(args.out, "result.json"), "w"))
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
