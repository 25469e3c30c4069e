"""Packed-row isolation: changing one sample's tokens and images leaves every other
sample's logits in the row bit-identical (run under torchrun at any TP x PP).

The row is built by the trainer's packer (``data.packing.pack_samples``, padded to a
multiple so a padding segment is in play) and run through the trainer's schedule
(``trainer.schedule.packed_batch`` -> ``forward_logits``), so the varlen attention path
(``cu_seqlens`` -> ``PackedSeqParams``) is the one under test. Writes result.json on rank 0.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from safetensors import safe_open

from megatron_r1v.checkpoint.weights import load_hf_weights
from megatron_r1v.config import ModelConfig, ParallelConfig
from megatron_r1v.data.packing import pack_samples
from megatron_r1v.data.template import IGNORE_INDEX, EncodedSample
from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.platform import destroy_distributed, init_distributed
from megatron_r1v.trainer.schedule import forward_logits, gather_vocab_logits, packed_batch
from megatron_r1v.trainer.setup import build_model_stage

TILES = (2, 0, 1, 3)  # tiles of each sample's one image (0: text only)


def make_samples(arch, seed: int) -> tuple[list[EncodedSample], list]:
    gen = torch.Generator().manual_seed(seed)
    img, side = arch.image_token_id, arch.vision.image_size
    samples, pixels = [], []
    for i, tiles in enumerate(TILES):
        text = torch.randint(0, img, (6 + 3 * i,), generator=gen)  # ids below the image token: never an image
        ids = torch.cat([text[:4], torch.full((tiles * arch.tokens_per_tile,), img), text[4:]])
        samples.append(EncodedSample(f"s{i}", ids, torch.full_like(ids, IGNORE_INDEX), len(ids),
                                     (tiles,) if tiles else (), tiles * arch.tokens_per_tile))
        pixels.append(torch.randn(tiles, 3, side, side, generator=gen) if tiles else None)
    return samples, pixels


def row_logits(stage, ctx, arch, samples, pixels) -> tuple[torch.Tensor, list[int], list[int]]:
    """Full-vocabulary logits [L, V] of the packed row (every rank), its cu_seqlens and sample order."""
    (row,) = pack_samples(samples, pixels, token_budget=10_000, pad_id=0, pad_to_multiple=64)
    kept = forward_logits(stage.model, [packed_batch(row)], ctx)
    mine = gather_vocab_logits(kept[0], ctx, arch.decoder.vocab_size)[0] if ctx.is_last_stage else None
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine if ctx.tp_rank == 0 else None)
    return next(t for t in everyone if t is not None), row.cu_seqlens.tolist(), row.sample_indices


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-file", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--backend", default="local", choices=["local", "te"])
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--changed", type=int, default=2, help="index of the sample that is changed")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp), force_cpu=args.backend == "local")
    arch = get_preset("tiny-r1v")
    stage = build_model_stage(arch, ctx, ModelConfig(backend=args.backend, params_dtype=args.dtype),
                              layout=TRANSFORMERS_LAYOUT)
    with safe_open(args.hf_file, framework="pt") as reader:
        load_hf_weights(stage.model, stage.stage_maps, stage.shard_spec, ctx, reader.get_tensor)
    samples, pixels = make_samples(arch, seed=0)
    before, bounds, order = row_logits(stage, ctx, arch, samples, pixels)
    other_samples, other_pixels = make_samples(arch, seed=1)  # same shapes, other tokens and images
    samples[args.changed] = other_samples[args.changed]
    pixels[args.changed] = other_pixels[args.changed]
    after, bounds_after, order_after = row_logits(stage, ctx, arch, samples, pixels)
    assert (bounds, order) == (bounds_after, order_after), "the same lengths must pack the same way"
    if ctx.rank == 0:
        segments = []
        for j, index in enumerate(order):
            span = slice(bounds[j], bounds[j + 1])
            segments.append({"sample": index, "tokens": bounds[j + 1] - bounds[j],
                             "identical": bool(torch.equal(before[span], after[span])),
                             "max_abs_diff": float((before[span] - after[span]).abs().max())})
        padding = slice(bounds[len(order)], bounds[-1])
        result = {"segments": segments, "padding_tokens": bounds[-1] - bounds[len(order)],
                  "padding_identical": bool(torch.equal(before[padding], after[padding])), "changed": args.changed}
        with open(os.path.join(args.out, "result.json"), "w") as out:
            json.dump(result, out)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
