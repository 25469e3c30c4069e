"""torchrun worker: one MPO forward/backward of packed preference pairs on a TP/PP/DP layout.

Loads the tiny Qwen2 weights, packs this DP rank's share of the pairs (every dp-th pair,
a pair's two sequences in one row) into fixed-length rows, runs ``mpo_forward_backward``
under Megatron DDP, and writes the step's metrics and the DP-reduced gradients under HF
names (rank 0).
"""

import dataclasses
import json
import os
import sys

import torch
from safetensors.torch import save_file

from megatron_r1v.checkpoint.weights import gather_hf_tensors
from megatron_r1v.data.packing import pack_samples
from megatron_r1v.data.template import EncodedSample
from megatron_r1v.losses.mpo import MPOLossConfig
from megatron_r1v.platform import destroy_distributed
from megatron_r1v.trainer.mpo_step import make_mpo_microbatch, mpo_forward_backward

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under PYTHONSAFEPATH=1
from tiny_qwen2_ddp import parse_args, tiny_qwen2_ddp  # noqa: E402

BUDGET = 48


def main() -> None:
    args = parse_args()
    ctx, stage, ddp = tiny_qwen2_ddp(args)

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
    result = mpo_forward_backward(ddp, microbatches, ctx, MPOLossConfig(**cases["config"]), cases["delta"], len(pairs))
    grads = gather_hf_tensors(ddp, stage.stage_maps, stage.shard_spec, ctx, grads=True)
    if ctx.rank == 0:
        save_file({k: v.contiguous() for k, v in grads.items()}, os.path.join(args.out, "grads.safetensors"))
        json.dump({**dataclasses.asdict(result), "microbatches": len(microbatches)},
                  open(os.path.join(args.out, "result.json"), "w"))
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
