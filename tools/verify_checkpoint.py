"""Check a Megatron model checkpoint against its HF source on a fixed random probe.

    torchrun --nproc_per_node N tools/verify_checkpoint.py --hf-dir H --mcore-dir M --tp T --pp P [--packed K]
    python tools/verify_checkpoint.py --integrity runs/x/step_000100   # files vs manifest only

Runs transformers' InternVLForConditionalGeneration (or Qwen2ForCausalLM) on the HF
checkpoint (a skywork-layout checkpoint is converted to transformers names in memory)
and the Megatron R1VModel loaded from the dist checkpoint at the given TP/PP, both in
fp32 on the same probe (one 2-tile random image and random text, fixed seed). With
``--packed K`` the probe is K samples of different lengths with 1-3 tile images, packed
into one row exactly as the trainer packs them (``data.packing.pack_samples``, varlen
attention over ``cu_seqlens``); transformers runs each sample alone, and every sample's
logits are compared. Prints one JSON line: max_abs_logit_diff, mean_abs_logit_diff,
tolerance, pass. Exits 1 when the check fails. The HF model runs on rank 0's CPU: for 38B that takes ~160 GB of RAM.
"""

import argparse
import json
import sys

import torch


def probe(arch, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = arch.decoder.vocab_size
    if arch.vision is None:
        return {"input_ids": torch.randint(0, vocab, (1, 24), generator=gen), "pixel_values": None}
    img = arch.image_token_id

    def text(n: int) -> torch.Tensor:
        ids = torch.randint(0, vocab, (n,), generator=gen)
        ids[ids == img] = (img + 1) % vocab  # image tokens only where the image goes
        return ids

    ids = torch.cat([text(5), torch.full((2 * arch.tokens_per_tile,), img), text(7)])
    side = arch.vision.image_size
    return {"input_ids": ids[None], "pixel_values": torch.randn(2, 3, side, side, generator=gen)}


def packed_probes(arch, count: int, seed: int = 0) -> list[dict]:
    """``count`` probes of different lengths; with a vision tower, sample i has (i % 3) + 1 tiles."""
    if count < 1:
        raise ValueError(f"--packed needs at least one sample, got {count}")
    gen = torch.Generator().manual_seed(seed)
    vocab, probes = arch.decoder.vocab_size, []
    for i in range(count):
        before, after = 3 + 2 * i, 4 + (5 * i) % 7
        ids = torch.randint(0, vocab, (before + after,), generator=gen)
        if arch.vision is None:
            probes.append({"input_ids": ids[None], "pixel_values": None})
            continue
        img = arch.image_token_id
        ids[ids == img] = (img + 1) % vocab
        tiles, side = i % 3 + 1, arch.vision.image_size
        ids = torch.cat([ids[:before], torch.full((tiles * arch.tokens_per_tile,), img), ids[before:]])
        probes.append({"input_ids": ids[None], "pixel_values": torch.randn(tiles, 3, side, side, generator=gen)})
    return probes


def packed_microbatch(arch, probes: list[dict]):
    """The probes packed into one row by the trainer's packer (and its batch dict)."""
    from megatron_r1v.data.packing import pack_samples
    from megatron_r1v.data.template import IGNORE_INDEX, EncodedSample
    from megatron_r1v.trainer.schedule import packed_batch

    samples, image_id = [], -1 if arch.image_token_id is None else arch.image_token_id
    for i, p in enumerate(probes):
        ids = p["input_ids"][0]
        tiles = () if p["pixel_values"] is None else (int(p["pixel_values"].shape[0]),)
        samples.append(EncodedSample(f"probe{i}", ids, torch.full_like(ids, IGNORE_INDEX), prompt_len=len(ids),
                                     tiles_per_image=tiles, num_image_tokens=int((ids == image_id).sum())))
    total = sum(len(s) for s in samples)
    rows = pack_samples(samples, [p["pixel_values"] for p in probes], token_budget=total, pad_id=0)
    assert len(rows) == 1, "a budget of the total length packs everything into one row"
    return rows[0], packed_batch(rows[0])


def hf_logits(hf_dir, arch, layout_name, batch) -> torch.Tensor:
    import transformers

    from megatron_r1v.checkpoint.hf_io import HFCheckpointReader
    from megatron_r1v.models.r1v.hf_config import transformers_internvl_config
    from megatron_r1v.models.r1v.hf_mapping import (
        SKYWORK_LAYOUT,
        TRANSFORMERS_LAYOUT,
        ShardSpec,
        hf_to_stored,
        model_tensor_maps,
        stored_to_hf,
    )

    if arch.vision is None:
        model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        return model.eval()(input_ids=batch["input_ids"]).logits
    config = transformers.InternVLConfig(**transformers_internvl_config(arch))
    if layout_name == "skywork":
        model = transformers.InternVLForConditionalGeneration(config).float()
        spec = ShardSpec.for_model(arch, 1)
        state = {}
        with HFCheckpointReader(hf_dir) as reader:
            for sky, ours in zip(model_tensor_maps(arch, SKYWORK_LAYOUT), model_tensor_maps(arch, TRANSFORMERS_LAYOUT)):
                stored = hf_to_stored(sky, {n: reader.get(n) for n in sky.hf}, spec)
                state.update(stored_to_hf(ours, stored, spec))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    else:
        model = transformers.InternVLForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.float32)
    return model.eval()(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits


def check_integrity(folder: str) -> int:
    """Offline integrity check of one checkpoint folder (``checkpoint/manifest.py``)."""
    import time
    import warnings

    from megatron_r1v.checkpoint.manifest import CheckpointIntegrityError, verify

    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no manifest: nothing can be verified, which is a failure here
            files = verify(folder)
    except (CheckpointIntegrityError, UserWarning) as err:
        print(json.dumps({"folder": folder, "pass": False, "error": str(err)}))
        return 1
    print(json.dumps({"folder": folder, "pass": True, "files": files,
                      "seconds": round(time.perf_counter() - started, 3)}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--integrity", metavar="DIR",
                        help="only check the files of the checkpoint folder DIR (a training checkpoint step_N, "
                             "its model/ folder, or an imported model) against their manifest, in one process; "
                             "prints one JSON line and exits 1 naming the first bad file")
    parser.add_argument("--hf-dir")
    parser.add_argument("--mcore-dir")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max |logit diff| allowed (fp32 on both sides: a few ulps; 1e-4 leaves margin)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--packed", type=int, metavar="K",
                        help="pack K probe samples (different lengths, images of 1-3 tiles) into one row as the "
                             "trainer does and compare each sample's logits with transformers run on it alone")
    args = parser.parse_args(argv)
    if args.packed is not None and args.packed < 1:
        parser.error(f"--packed needs at least 1 sample, got {args.packed}")
    if args.integrity:
        return check_integrity(args.integrity)
    if not (args.hf_dir and args.mcore_dir):
        parser.error("give --hf-dir and --mcore-dir (the parity check), or --integrity DIR")

    return check_parity(args)


def megatron_logits(args, ctx, arch, microbatch: dict) -> torch.Tensor:
    """Full-vocabulary logits ``[B, L, V]`` of the Megatron model on every rank."""
    import torch.distributed as dist

    from megatron_r1v.checkpoint.model_fragments import load_model_checkpoint
    from megatron_r1v.config import ModelConfig
    from megatron_r1v.models.r1v.hf_mapping import QWEN2_LAYOUT, TRANSFORMERS_LAYOUT
    from megatron_r1v.trainer.schedule import forward_logits, gather_vocab_logits
    from megatron_r1v.trainer.setup import build_model_stage

    layout = QWEN2_LAYOUT if arch.vision is None else TRANSFORMERS_LAYOUT
    stage = build_model_stage(arch, ctx, ModelConfig(backend="local", params_dtype="fp32"), layout=layout)
    load_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx, args.mcore_dir)
    kept = forward_logits(stage.model, [microbatch], ctx)
    mine = None
    if ctx.is_last_stage:
        logits = gather_vocab_logits(kept[0], ctx, arch.decoder.vocab_size)
        if ctx.tp_rank == 0 and ctx.dp_rank == 0:
            mine = logits
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    return next(t for t in everyone if t is not None)


def probe_batches(args, arch):
    """(the Megatron micro-batch, the probes transformers runs one by one, the row's
    ``[start, end)`` of each probe's logits)."""
    from megatron_r1v.trainer.schedule import causal_lm_microbatch

    if args.packed is None:
        batch = probe(arch, args.seed)
        mb = causal_lm_microbatch(batch["input_ids"])
        if batch["pixel_values"] is not None:
            mb["pixel_values"] = batch["pixel_values"]
        return mb, [batch], [(0, batch["input_ids"].shape[1])]
    probes = packed_probes(arch, args.packed, args.seed)
    row, mb = packed_microbatch(arch, probes)
    bounds = row.cu_seqlens.tolist()
    spans = {index: (bounds[j], bounds[j + 1]) for j, index in enumerate(row.sample_indices)}
    return mb, probes, [spans[i] for i in range(len(probes))]


def check_parity(args) -> int:
    import torch.distributed as dist

    from megatron_r1v.checkpoint.conversion import detect_layout, read_meta
    from megatron_r1v.checkpoint.hf_io import HFCheckpointReader
    from megatron_r1v.config import ParallelConfig
    from megatron_r1v.platform import destroy_distributed, init_distributed

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp), force_cpu=True)
    arch, _ = read_meta(args.mcore_dir)
    microbatch, probes, spans = probe_batches(args, arch)
    logits = megatron_logits(args, ctx, arch, microbatch)
    verdict = [None]
    if ctx.rank == 0:
        with HFCheckpointReader(args.hf_dir) as reader:
            layout_name = detect_layout(reader.config(), reader.names())
        diffs = []
        with torch.no_grad():
            for batch, (start, end) in zip(probes, spans):
                reference = hf_logits(args.hf_dir, arch, layout_name, batch)
                diffs.append((logits[:, start:end] - reference).abs().flatten())
        diff = torch.cat(diffs)
        verdict = [{"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
                    "tolerance": args.tolerance, "pass": bool(diff.max().item() <= args.tolerance),
                    "tp": args.tp, "pp": args.pp, "hf_layout": layout_name, "packed": args.packed}]
        print(json.dumps(verdict[0]), flush=True)
    dist.broadcast_object_list(verdict, src=0)
    destroy_distributed(ctx)
    return 0 if verdict[0]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
