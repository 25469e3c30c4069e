"""Assemble an R1V checkpoint (released skywork / InternVL-chat layout) from its public parts.

    python tools/assemble_checkpoint.py --vision InternViT-6B-448px-V2_5 --llm QwQ-32B --out r1v2-start \
        [--adapter-from CKPT | --adapter-init random] [--downsample-ratio 0.5] [--ps-version v2] [--seed S] \
        [--max-shard-size 5GB] [--force]

--vision: the standalone InternViT release (InternVisionModel; or an InternVL-chat
checkpoint, whose vision_model.* is taken). --llm: a Qwen2ForCausalLM folder with its
tokenizer (or an InternVL-chat checkpoint, whose language_model.* is taken). The adapter
(mlp1) is copied from --adapter-from (an InternVL-chat / R1V checkpoint; its widths must
fit) or drawn fresh from --seed (--adapter-init random, the default). The tokenizer gets
InternVL's <img> </img> <IMG_CONTEXT> <quad> </quad> <ref> </ref> <box> </box> (those it
lacks); their embedding / lm_head rows are the mean of the existing tokens' rows. The
result is what `tools/convert_checkpoint.py import` reads. Tensors are copied one at a
time (memory near the largest tensor), the output appears complete or not at all, and
an existing output is refused without --force. Prints one JSON line; exits 1 naming the
problem on bad input. See megatron_r1v/checkpoint/assemble.py.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vision", required=True, type=Path, help="InternViT folder (e.g. InternViT-6B-448px-V2_5)")
    parser.add_argument("--llm", required=True, type=Path, help="Qwen2ForCausalLM folder with its tokenizer")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--adapter-from", type=Path, default=None,
                         help="InternVL-chat / R1V checkpoint whose mlp1 is copied")
    adapter.add_argument("--adapter-init", choices=["random"], default=None,
                         help="a fresh adapter (the default): LayerNorm 1/0, Linear U(+-1/sqrt(fan_in)), from --seed")
    parser.add_argument("--downsample-ratio", type=float, default=None,
                        help="pixel-shuffle ratio (default: --adapter-from's config, else 0.5)")
    parser.add_argument("--ps-version", choices=["v1", "v2"], default=None,
                        help="pixel-shuffle token order (default: --adapter-from's config, else v2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh adapter (default 0)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)

    from megatron_r1v.checkpoint.assemble import AssemblyOptions, assemble_checkpoint
    from megatron_r1v.checkpoint.hf_io import CheckpointError, parse_size

    start = time.time()
    try:
        opts = AssemblyOptions(
            vision=args.vision, llm=args.llm, out=args.out, adapter_from=args.adapter_from,
            downsample_ratio=args.downsample_ratio, ps_version=args.ps_version, seed=args.seed, force=args.force,
            max_shard_bytes=parse_size(args.max_shard_size),
        )
        report = assemble_checkpoint(opts)
    except (CheckpointError, ValueError, OSError) as err:  # OSError: a disk that fills, a read-only mount
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({**dataclasses.asdict(report), "seconds": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
