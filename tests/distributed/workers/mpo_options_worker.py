"""torchrun worker: one MPO step with the InternVL/TRL options on a TP/PP/DP layout.

As ``mpo_step_worker.py`` (the tiny Qwen2, this DP rank's share of the pairs packed into
rows), but BCO's delta comes from ``losses.mpo.bco_delta`` with the cases' mode: for
``trl_running_mean`` the step's rewards are read first by ``step_reward_sums`` (a
forward-only pass) and folded into the cases' earlier running mean, as the trainer does;
the loss config may set ``nll_normalization``. Writes the step's metrics, the delta used,
the pre-pass reward sum and count, and the DP-reduced gradients under HF names (rank 0).
"""

import dataclasses
import os
import sys

import torch

from megatron_r1v.losses.mpo import MPOLossConfig, RewardMean, bco_delta
from megatron_r1v.platform import destroy_distributed
from megatron_r1v.trainer.mpo_step import mpo_forward_backward, step_reward_sums

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under PYTHONSAFEPATH=1
from r1v_checks import mpo_pair_microbatches, save_grads_and_result  # noqa: E402
from tiny_qwen2_ddp import parse_args, tiny_qwen2_ddp  # noqa: E402

BUDGET = 48


def main() -> None:
    args = parse_args()
    ctx, stage, ddp = tiny_qwen2_ddp(args)

    cases = torch.load(args.cases)
    pairs, cfg = cases["pairs"], MPOLossConfig(**cases["config"])
    microbatches = mpo_pair_microbatches(pairs, list(range(ctx.dp_rank, len(pairs), ctx.dp)), BUDGET)
    past = RewardMean(**cases["past"])
    reward_sum, reward_count = step_reward_sums(ddp, microbatches, ctx, cfg.beta)
    delta = bco_delta(cases["bco_delta"], past, reward_sum, reward_count)
    ddp.zero_grad_buffer()
    result = mpo_forward_backward(ddp, microbatches, ctx, cfg, delta, len(pairs))
    metrics = {**dataclasses.asdict(result), "delta": delta, "reward_sum": reward_sum, "reward_count": reward_count,
               "microbatches": len(microbatches)}
    save_grads_and_result(ctx, stage, ddp, metrics, args.out)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
