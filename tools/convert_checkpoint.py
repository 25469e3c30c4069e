"""Convert checkpoints between Hugging Face safetensors and Megatron dist_checkpointing.

import (run under torchrun with the target layout; any TP/PP can load the result):
    torchrun --nproc_per_node 4 tools/convert_checkpoint.py import --hf-dir H --out M --tp 2 --pp 2 [--dtype bf16]
export (one process):
    python tools/convert_checkpoint.py export --mcore-dir M --out H [--max-shard-size 5GB]
"""

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF -> Megatron (run under torchrun, world = tp * pp)")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--out", required=True)
    imp.add_argument("--layout", default="auto", choices=["auto", "transformers", "qwen2", "skywork"])
    imp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    imp.add_argument("--tp", type=int, default=1)
    imp.add_argument("--pp", type=int, default=1)
    imp.add_argument("--force", action="store_true", help="replace an existing output directory")
    imp.add_argument("--image-token-id", type=int, default=None,
                     help="<IMG_CONTEXT> id for skywork checkpoints whose config/tokenizer do not give it")
    exp = sub.add_parser("export", help="Megatron -> HF (one process)")
    exp.add_argument("--mcore-dir", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--layout", default=None, choices=["transformers", "qwen2", "skywork"])
    exp.add_argument("--max-shard-size", default="5GB")
    exp.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    from megatron_r1v.checkpoint.conversion import export_checkpoint, import_checkpoint
    from megatron_r1v.checkpoint.hf_io import CheckpointError, parse_size
    from megatron_r1v.config import ParallelConfig
    from megatron_r1v.platform import destroy_distributed, init_distributed

    start = time.time()
    parallel = ParallelConfig(tp=args.tp, pp=args.pp) if args.command == "import" else ParallelConfig()
    # Conversion is host-side work: gloo and the CPU keep GPUs free and memory predictable.
    ctx = init_distributed(parallel, force_cpu=True)
    try:
        if args.command == "import":
            if ctx.dp != 1:
                raise CheckpointError(f"run import with world size tp*pp = {args.tp * args.pp}, not {ctx.world_size}")
            import_checkpoint(args.hf_dir, args.out, ctx, layout=args.layout, dtype=args.dtype, force=args.force,
                              image_token_id=args.image_token_id)
        else:
            if ctx.world_size != 1:
                raise CheckpointError("run export in one process")
            export_checkpoint(args.mcore_dir, args.out, layout=args.layout,
                              max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    except (CheckpointError, ValueError, KeyError, OSError) as err:  # OSError: a disk that fills, a read-only mount
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed(ctx)
    if ctx.rank == 0:
        print(f"{args.command} done in {time.time() - start:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
