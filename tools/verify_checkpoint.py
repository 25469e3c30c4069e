"""Check a Megatron model checkpoint against its HF source on a fixed random probe.

    torchrun --nproc_per_node N tools/verify_checkpoint.py --hf-dir H --mcore-dir M --tp T --pp P
    python tools/verify_checkpoint.py --integrity runs/x/step_000100   # files vs manifest only

Runs transformers' InternVLForConditionalGeneration (or Qwen2ForCausalLM) on the HF
checkpoint (a skywork-layout checkpoint is converted to transformers names in memory)
and the Megatron R1VModel loaded from the dist checkpoint at the given TP/PP, both in
fp32 on the same probe (one 2-tile random image and random text, fixed seed). Prints
one JSON line: max_abs_logit_diff, mean_abs_logit_diff, tolerance, pass. Exits 1 when
the check fails. The HF model runs on rank 0's CPU: for 38B that takes ~160 GB of RAM.
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
    args = parser.parse_args(argv)
    if args.integrity:
        return check_integrity(args.integrity)
    if not (args.hf_dir and args.mcore_dir):
        parser.error("give --hf-dir and --mcore-dir (the parity check), or --integrity DIR")

    import torch.distributed as dist

    from megatron_r1v.checkpoint.conversion import detect_layout, read_meta
    from megatron_r1v.checkpoint.hf_io import HFCheckpointReader
    from megatron_r1v.checkpoint.model_fragments import load_model_checkpoint
    from megatron_r1v.config import ModelConfig, ParallelConfig
    from megatron_r1v.models.r1v.hf_mapping import QWEN2_LAYOUT, TRANSFORMERS_LAYOUT
    from megatron_r1v.platform import destroy_distributed, init_distributed
    from megatron_r1v.trainer.schedule import causal_lm_microbatch, forward_logits, gather_vocab_logits
    from megatron_r1v.trainer.setup import build_model_stage

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp), force_cpu=True)
    arch, _ = read_meta(args.mcore_dir)
    layout = QWEN2_LAYOUT if arch.vision is None else TRANSFORMERS_LAYOUT
    stage = build_model_stage(arch, ctx, ModelConfig(backend="local", params_dtype="fp32"), layout=layout)
    load_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx, args.mcore_dir)
    batch = probe(arch, args.seed)
    mb = causal_lm_microbatch(batch["input_ids"])
    if batch["pixel_values"] is not None:
        mb["pixel_values"] = batch["pixel_values"]
    kept = forward_logits(stage.model, [mb], ctx)
    mine = None
    if ctx.is_last_stage:
        logits = gather_vocab_logits(kept[0], ctx, arch.decoder.vocab_size)
        if ctx.tp_rank == 0 and ctx.dp_rank == 0:
            mine = logits
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    gathered = [next(t for t in everyone if t is not None)]
    verdict = [None]
    if ctx.rank == 0:
        with HFCheckpointReader(args.hf_dir) as reader:
            layout_name = detect_layout(reader.config(), reader.names())
        with torch.no_grad():
            reference = hf_logits(args.hf_dir, arch, layout_name, batch)
        diff = (gathered[0] - reference).abs()
        verdict = [{"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
                    "tolerance": args.tolerance, "pass": bool(diff.max().item() <= args.tolerance),
                    "tp": args.tp, "pp": args.pp, "hf_layout": layout_name}]
        print(json.dumps(verdict[0]), flush=True)
    dist.broadcast_object_list(verdict, src=0)
    destroy_distributed(ctx)
    return 0 if verdict[0]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
