"""The trainer's context-parallel path on CUDA with Transformer Engine (run under torchrun with
``--cp`` ranks): the tiny R1V model with images, one packed row of odd-length samples packed
CP-aware (``seq_multiple=2*cp``), log-probs (``trainer.schedule.compute_logprobs``) and logits
(``forward_logits``), gathered back to the row's order. Rank 0 saves them to ``--out``; the test
compares cp=2 with cp=1.
"""

import argparse

import torch
from packed_isolation_worker import make_samples  # this folder is on sys.path (torchrun runs the script)
from safetensors import safe_open

from megatron_r1v.checkpoint.weights import load_hf_weights
from megatron_r1v.config import ModelConfig, ParallelConfig
from megatron_r1v.data.packing import pack_samples
from megatron_r1v.data.template import IGNORE_INDEX
from megatron_r1v.models.r1v.context_parallel import cp_token_multiple
from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.platform import destroy_distributed, init_distributed
from megatron_r1v.trainer.schedule import compute_logprobs, forward_logits, gather_vocab_logits, packed_batch
from megatron_r1v.trainer.setup import build_model_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-file", required=True)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ctx = init_distributed(ParallelConfig(cp=args.cp))
    arch = get_preset("tiny-r1v")
    stage = build_model_stage(arch, ctx, ModelConfig(backend="te", params_dtype="bf16"), layout=TRANSFORMERS_LAYOUT)
    with safe_open(args.hf_file, framework="pt") as reader:
        load_hf_weights(stage.model, stage.stage_maps, stage.shard_spec, ctx, reader.get_tensor)
    stage.model.eval()
    samples, pixels = make_samples(arch, seed=0)
    (row,) = pack_samples(samples, pixels, token_budget=10_000, pad_id=0, seq_multiple=cp_token_multiple(args.cp))
    batch = packed_batch(row)
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, arch.image_token_id, batch["labels"].shape, generator=gen)
    labels[batch["tokens"] == arch.image_token_id] = IGNORE_INDEX
    batch["labels"], batch["loss_mask"] = labels, (labels != IGNORE_INDEX).float()
    ((logprobs, _),) = compute_logprobs(stage.model, [batch], ctx)
    (logits,) = forward_logits(stage.model, [batch], ctx)
    logits = gather_vocab_logits(logits, ctx, arch.decoder.vocab_size)
    if ctx.rank == 0:
        torch.save({"logprobs": logprobs.float(), "logits": logits.float()[0]}, args.out)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
