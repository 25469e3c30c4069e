"""Pretrain tiny R1V parts on a perception synthetic set and write them in their public formats.

    python tools/make_tiny_parts.py --data DATA --out PARTS [--preset tiny-r1v-chat] \
        [--vision-steps 300] [--llm-steps 300] [--batch-size 32] [--lr 3e-3] [--seed 0] \
        [--chat-family qwq|qwen2.5|r1-distill] [--force]

DATA is ``python -m megatron_r1v.data.synthetic --family perception``'s output (training
split). Writes PARTS/InternViT-tiny (a standalone InternViT: InternVisionModel config.json +
model.safetensors) and PARTS/Qwen2-tiny (Qwen2ForCausalLM + tokenizer without InternVL's
image tokens), which ``tools/assemble_checkpoint.py --vision PARTS/InternViT-tiny --llm
PARTS/Qwen2-tiny`` joins with a fresh adapter. How each part is warmed up and why:
``megatron_r1v/tiny_parts.py``. Prints progress, then one JSON line; exits 1 naming the
problem on bad input (nothing is left half-written).
"""

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="a perception synthetic set (training split)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (InternViT-tiny/ and Qwen2-tiny/)")
    parser.add_argument("--preset", default="tiny-r1v-chat", help="widths of the parts (default tiny-r1v-chat)")
    parser.add_argument("--vision-steps", type=int, default=300, help="vision warm-up steps (default 300)")
    parser.add_argument("--llm-steps", type=int, default=300, help="language warm-up steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=32, help="tiles / documents per step (default 32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batches (default 0)")
    parser.add_argument("--chat-family", choices=["qwq", "qwen2.5", "r1-distill"], default="qwq",
                        help="special tokens and chat template of the LLM's tokenizer (default qwq)")
    parser.add_argument("--force", action="store_true", help="replace existing part folders")
    args = parser.parse_args(argv)

    from megatron_r1v.tiny_parts import PartsOptions, make_tiny_parts

    start = time.time()
    opts = PartsOptions(data=args.data, out=args.out, preset=args.preset, vision_steps=args.vision_steps,
                        llm_steps=args.llm_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        chat_family=args.chat_family, force=args.force)
    try:
        summary = make_tiny_parts(opts, log=lambda line: print(line, flush=True))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 1
    print(json.dumps({**summary, "seconds": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
