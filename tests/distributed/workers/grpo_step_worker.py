"""torchrun worker: one GRPO forward/backward of packed micro-batches on a TP/PP/DP layout.

Loads the tiny Qwen2 weights, packs this DP rank's share of the samples (every
dp-th sample) into fixed-length rows, runs ``grpo_forward_backward`` under Megatron DDP,
and writes the step's loss and the DP-reduced gradients under HF names (rank 0).
"""

import os
import sys

import torch

from megatron_r1v.data.packing import pack_samples
from megatron_r1v.data.template import EncodedSample
from megatron_r1v.losses.grpo import GRPOLossConfig, token_weights
from megatron_r1v.platform import destroy_distributed
from megatron_r1v.trainer.grpo_step import grpo_forward_backward, make_grpo_microbatch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under PYTHONSAFEPATH=1
from r1v_checks import save_grads_and_result  # noqa: E402
from tiny_qwen2_ddp import parse_args, tiny_qwen2_ddp  # noqa: E402

BUDGET = 48


def main() -> None:
    args = parse_args()
    ctx, stage, ddp = tiny_qwen2_ddp(args)

    cases = torch.load(args.cases)
    cfg = GRPOLossConfig(**cases["config"])
    samples = cases["samples"]
    n_total = len(samples)
    mine = list(range(ctx.dp_rank, n_total, ctx.dp))
    encoded = [EncodedSample(str(i), samples[i]["tokens"], samples[i]["labels"], 0, (), 0) for i in mine]
    packed = pack_samples(encoded, [None] * len(encoded), BUDGET, pad_id=0, pad_to_multiple=BUDGET)
    microbatches = []
    for mb in packed:
        parts = {k: [] for k in ("old", "ref", "adv", "w")}
        for local in mb.sample_indices:
            s = samples[mine[local]]
            targets = s["labels"] != -100
            n_resp = int(targets.sum())
            parts["old"].append(s["old"])
            parts["ref"].append(s["ref"])
            parts["adv"].append(torch.full_like(s["old"], s["adv"]))
            weight = token_weights(torch.tensor([n_resp]), cfg.normalization, n_total, 0)[0]
            parts["w"].append(torch.where(targets, weight, 0.0))
        pad = BUDGET - sum(len(p) for p in parts["old"])
        vec = {k: torch.cat(v + [torch.zeros(pad)]) for k, v in parts.items()}
        microbatches.append(make_grpo_microbatch(mb, vec["old"], vec["ref"], vec["adv"], vec["w"]))
    ddp.zero_grad_buffer()
    result = grpo_forward_backward(ddp, microbatches, ctx, cfg)
    metrics = {"loss": result.loss, "kl": result.kl, "clip_fraction": result.clip_fraction,
               "microbatches": len(microbatches)}
    save_grads_and_result(ctx, stage, ddp, metrics, args.out)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
