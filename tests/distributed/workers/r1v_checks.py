"""Helpers the R1V / MPO test workers share: the vision tower's dummy heads, and MPO pairs
packed into micro-batches exactly as the trainer packs them."""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_r1v.checkpoint.weights import gather_hf_tensors, unwrap_model
from megatron_r1v.data.packing import pack_samples
from megatron_r1v.data.template import EncodedSample
from megatron_r1v.trainer.mpo_step import make_mpo_microbatch


def dummy_head_max(model, read: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, int]:
    """(largest |read(param)| over every dummy-head entry of the vision tower: q/k/v rows, q/k
    norm entries, projection columns; entries checked), over all ranks. ``read`` picks the
    weight itself or its gradient (``main_grad``). A stage without the tower checks none."""
    stats = torch.zeros(2, dtype=torch.float64)  # [max |dummy entry|, entries checked]
    vision = model.vision
    if vision is not None:
        d, real = vision.arch.head_dim, vision.arch.num_attention_heads
        heads_local = vision.config.num_attention_heads // vision.config.tensor_model_parallel_size
        first = dist.get_rank(vision.encoder.tp_group) * heads_local
        for layer in vision.encoder.layers:
            attn = layer.self_attention
            for h in range(heads_local):
                if first + h < real:
                    continue
                cols = slice(h * d, (h + 1) * d)
                parts = [read(attn.linear_qkv.weight).view(heads_local, 3 * d, -1)[h],
                         read(attn.linear_proj.weight)[:, cols], read(attn.q_layernorm.weight)[cols],
                         read(attn.k_layernorm.weight)[cols]]
                for part in parts:
                    stats[0] = max(stats[0], part.detach().abs().max().double())
                    stats[1] += part.numel()
    maxed, counted = stats[:1].clone(), stats[1:].clone()
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    dist.all_reduce(counted)
    return float(maxed), int(counted)


def mpo_pair_microbatches(pairs: list[dict], mine: list[int], budget: int, tokens_per_tile: int = 0) -> list[dict]:
    """This rank's pairs (indices ``mine``) packed into rows of ``budget`` tokens, a pair's
    chosen and rejected (and their copies of the prompt's image, ``tiles`` tiles) in one
    row, as MPO micro-batches. A pair: ``chosen`` / ``rejected`` {tokens, labels},
    ``ref_chosen`` / ``ref_rejected``, optionally ``tiles``, ``pixel_values``, ``prompt_len``."""
    encoded, pixels = [], []
    for i in mine:
        tiles = pairs[i].get("tiles", 0)
        for side in ("chosen", "rejected"):
            seq = pairs[i][side]
            encoded.append(EncodedSample(f"{i}{side[0]}", seq["tokens"], seq["labels"], pairs[i].get("prompt_len", 0),
                                         (tiles,) if tiles else (), tiles * tokens_per_tile))
            pixels.append(pairs[i].get("pixel_values"))
    groups = [[2 * k, 2 * k + 1] for k in range(len(mine))]
    packed = pack_samples(encoded, pixels, budget, pad_id=0, pad_to_multiple=budget, groups=groups)
    microbatches = []
    for mb in packed:
        row = {s: pos for pos, s in enumerate(mb.sample_indices)}
        local_pairs = sorted({s // 2 for s in mb.sample_indices})
        microbatches.append(make_mpo_microbatch(
            mb, [(row[2 * k], row[2 * k + 1]) for k in local_pairs],
            [pairs[mine[k]]["ref_chosen"] for k in local_pairs], [pairs[mine[k]]["ref_rejected"] for k in local_pairs]))
    return microbatches


def save_step_outputs(ctx, stage, ddp, result: dict, out: str) -> None:
    """Adds the dummy-head gradient check to ``result`` (gradients reach ``main_grad``; a
    dummy head's must be exactly zero) and writes ``grads.safetensors`` (HF names, gathered
    over TP and PP) and ``result.json`` into ``out`` on rank 0 (collective)."""
    maxed, counted = dummy_head_max(unwrap_model(ddp), lambda p: p.main_grad)
    result.update(dummy_grad_max_abs=maxed, dummy_entries=counted)
    save_grads_and_result(ctx, stage, ddp, result, out)


def save_grads_and_result(ctx, stage, ddp, result: dict, out: str) -> None:
    """Writes ``grads.safetensors`` (the DP-reduced gradients under HF names, gathered over TP
    and PP) and ``result`` as ``result.json`` into ``out`` on rank 0 (collective)."""
    grads = gather_hf_tensors(ddp, stage.stage_maps, stage.shard_spec, ctx, grads=True)
    if ctx.rank == 0:
        save_file({k: v.contiguous() for k, v in grads.items()}, os.path.join(out, "grads.safetensors"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
