"""torchrun worker: one MPO forward/backward of packed preference pairs on a TP/PP/DP layout.

Loads the tiny Qwen2 weights, packs this DP rank's share of the pairs (every dp-th pair,
a pair's two sequences in one row) into fixed-length rows, runs ``mpo_forward_backward``
under Megatron DDP, and writes the step's metrics and the DP-reduced gradients under HF
names (rank 0).
"""

import dataclasses
import os
import sys

import torch

from megatron_r1v.losses.mpo import MPOLossConfig
from megatron_r1v.platform import destroy_distributed
from megatron_r1v.trainer.mpo_step import mpo_forward_backward

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under PYTHONSAFEPATH=1
from r1v_checks import mpo_pair_microbatches, save_grads_and_result  # noqa: E402
from tiny_qwen2_ddp import parse_args, tiny_qwen2_ddp  # noqa: E402

BUDGET = 48


def main() -> None:
    args = parse_args()
    ctx, stage, ddp = tiny_qwen2_ddp(args)

    cases = torch.load(args.cases)
    pairs = cases["pairs"]
    microbatches = mpo_pair_microbatches(pairs, list(range(ctx.dp_rank, len(pairs), ctx.dp)), BUDGET)
    ddp.zero_grad_buffer()
    result = mpo_forward_backward(ddp, microbatches, ctx, MPOLossConfig(**cases["config"]), cases["delta"], len(pairs))
    save_grads_and_result(ctx, stage, ddp, {**dataclasses.asdict(result), "microbatches": len(microbatches)}, args.out)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
