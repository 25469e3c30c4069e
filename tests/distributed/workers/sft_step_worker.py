"""torchrun worker: one SFT forward/backward of packed conversations with images on a TP/PP/DP layout.

Loads transformers-layout InternVL weights into this rank's R1V stage (``model.freeze=all``,
``vision_grads_worker.r1v_ddp``), takes every dp-th conversation, counts the step's
assistant tokens over DP (``trainer.sft.step_counts``), packs the conversations as the
trainer does (``data.packing.pack_conversations``; rows padded to the budget under PP) and
runs ``trainer.sft_step.sft_forward_backward``. Writes (rank 0) every gradient under its
transformers name and result.json: the step's loss and token count, the tiles per row, and
the largest |gradient| on a dummy attention head of the vision tower (must be exactly 0).
"""

import argparse
import dataclasses
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under PYTHONSAFEPATH=1
from r1v_checks import save_step_outputs  # noqa: E402
from vision_grads_worker import r1v_ddp  # noqa: E402

from megatron_r1v.data.packing import pack_conversations  # noqa: E402
from megatron_r1v.data.template import EncodedSample  # noqa: E402
from megatron_r1v.platform import destroy_distributed  # noqa: E402
from megatron_r1v.trainer.sft import step_counts  # noqa: E402
from megatron_r1v.trainer.sft_step import make_sft_microbatch, sft_forward_backward  # noqa: E402

BUDGET = 160  # tokens per packed row: 2-3 conversations; every row is padded to it under PP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-file", required=True, help="safetensors with transformers' in-memory InternVL names")
    parser.add_argument("--cases", required=True, help="torch file written by tests/distributed/test_sft_step.py")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # parity means fp32 if this ever runs on a GPU
    ctx, stage, ddp = r1v_ddp(args)
    cases = torch.load(args.cases)["samples"]
    items = [SimpleNamespace(sample=EncodedSample(c["id"], c["input_ids"], c["labels"], c["prompt_len"], c["tiles"],
                                                  c["image_tokens"]), pixel_values=c["pixel_values"])
             for c in cases[ctx.dp_rank::ctx.dp]]
    targets, _ = step_counts(items, ctx)
    rows = pack_conversations(items, BUDGET, pipeline=ctx.pp > 1)
    microbatches = [make_sft_microbatch(row) for row in rows]
    ddp.zero_grad_buffer()
    result = dataclasses.asdict(sft_forward_backward(ddp, microbatches, ctx, targets))
    result.update(microbatches=len(microbatches),
                  samples_per_row=[len(row.sample_indices) for row in rows],
                  tiles_per_row=[int(mb.get("pixel_values", torch.empty(0)).shape[0]) for mb in microbatches])
    save_step_outputs(ctx, stage, ddp, result, args.out)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
