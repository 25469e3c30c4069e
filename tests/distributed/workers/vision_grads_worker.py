"""torchrun worker: gradients of the whole R1V model (vision tower included) on a TP/PP/DP layout.

Loads transformers-layout InternVL weights into this rank's R1V stage with
``model.freeze=all`` under Megatron DDP, then

lm:  runs one micro-batch per case row (a token-mean CE over the row's logits, rows with
     images of 1-3 tiles) through the trainer's schedule;
mpo: packs this DP rank's preference pairs (chosen and rejected in one row, with their
     images) and runs ``mpo_forward_backward``.

Writes (rank 0) every gradient under its transformers name and result.json: the step's
metrics, and the largest |gradient| on a dummy attention head of the vision tower over
all ranks (dummy heads pad 3 heads to a multiple of TP; they must get exactly none).
"""

import argparse
import dataclasses
import os
import sys

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under PYTHONSAFEPATH=1
from lm_steps import lm_forward_backward  # noqa: E402
from r1v_checks import mpo_pair_microbatches, save_step_outputs  # noqa: E402

from megatron_r1v.checkpoint.weights import load_hf_weights  # noqa: E402
from megatron_r1v.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_r1v.losses.mpo import MPOLossConfig  # noqa: E402
from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT  # noqa: E402
from megatron_r1v.models.r1v.presets import get_preset  # noqa: E402
from megatron_r1v.platform import destroy_distributed, init_distributed  # noqa: E402
from megatron_r1v.trainer.mpo_step import mpo_forward_backward  # noqa: E402
from megatron_r1v.trainer.schedule import attach_ddp_hooks, causal_lm_microbatch  # noqa: E402
from megatron_r1v.trainer.setup import build_model_stage, wrap_ddp  # noqa: E402

PRESET = "tiny-r1v"
TOKENS_PER_TILE = get_preset(PRESET).tokens_per_tile
BUDGET = 96  # tokens per packed MPO row; every row is padded to it (PP needs one shape)


def r1v_ddp(args: argparse.Namespace):
    """(ctx, stage, ddp): this rank's R1V stage, every part trainable, weights from HF."""
    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    stage = build_model_stage(get_preset(PRESET), ctx, ModelConfig(preset=PRESET, backend="local", freeze="all"),
                              layout=TRANSFORMERS_LAYOUT)
    assert sorted(stage.trainable) == sorted(n for n, _ in stage.model.named_parameters())
    with safe_open(args.hf_file, framework="pt") as reader:
        load_hf_weights(stage.model, stage.stage_maps, stage.shard_spec, ctx, reader.get_tensor)
    ddp = wrap_ddp(stage.model, stage.config)
    attach_ddp_hooks(ddp)
    return ctx, stage, ddp


def lm_step(args, ctx, ddp) -> dict:
    """One micro-batch per row (rows of one length, as 1F1B needs); returns the mean loss."""
    cases = torch.load(args.cases)
    microbatches = []
    for row in cases["rows"]:
        batch = causal_lm_microbatch(row["tokens"][None], row["labels"][None])
        batch["pixel_values"] = row["pixel_values"]
        microbatches.append(batch)
    return {"loss": lm_forward_backward(ddp, microbatches, ctx).loss, "microbatches": len(microbatches)}


def mpo_step(args, ctx, ddp) -> dict:
    cases = torch.load(args.cases)
    pairs = cases["pairs"]
    microbatches = mpo_pair_microbatches(pairs, list(range(ctx.dp_rank, len(pairs), ctx.dp)), BUDGET, TOKENS_PER_TILE)
    result = mpo_forward_backward(ddp, microbatches, ctx, MPOLossConfig(**cases["config"]), cases["delta"],
                                  len(pairs))
    tiles_per_row = [int(mb.get("pixel_values", torch.empty(0)).shape[0]) for mb in microbatches]
    return {**dataclasses.asdict(result), "microbatches": len(microbatches), "tiles_per_row": tiles_per_row}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["lm", "mpo"])
    parser.add_argument("--hf-file", required=True, help="safetensors with transformers' in-memory InternVL names")
    parser.add_argument("--cases", required=True, help="torch file written by tests/distributed/test_vision_grads.py")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # parity means fp32 if this ever runs on a GPU
    torch.backends.cudnn.allow_tf32 = False
    ctx, stage, ddp = r1v_ddp(args)
    ddp.zero_grad_buffer()
    result = (lm_step if args.mode == "lm" else mpo_step)(args, ctx, ddp)
    save_step_outputs(ctx, stage, ddp, result, args.out)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
