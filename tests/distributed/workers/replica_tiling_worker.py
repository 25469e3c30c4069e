"""torchrun worker: one tiling rank per replica (data/replica_tiling.py) on a TP x PP layout (gloo).

Every rank builds what ``trainer/build.py`` builds for the data: the load-time image check
(``check_images_once``), the tiler (``build_replica_tiler``) and a ``PromptLoader``, then
takes ``--steps`` batches. ``PIL.Image.open`` is counted on every rank: every decode (PIL's,
the load-time check's) and every header DALI's tiler reads goes through it. Then the bad-image
cases: ``prompts_bad.jsonl`` names a truncated file, which the load-time check drops
(``on_bad_sample=skip``) and which, loaded without that check (as if it went bad after
start-up), is tiled with ``on_bad_sample=skip`` and ``error``.

Each rank writes ``<out>/rank<R>.json``: its role, the description, the counts of opened
images per phase, every item (id, tiles per image, prompt ids, pixel shape and SHA-256) and
the bad-image outcomes. Any exception exits non-zero.
"""

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import AutoTokenizer

from megatron_r1v.config import DataConfig, ParallelConfig
from megatron_r1v.data.images import ImageError
from megatron_r1v.data.loader import PromptLoader
from megatron_r1v.data.replica_tiling import build_replica_tiler, check_images_once, tiling_role
from megatron_r1v.data.schema import load_records
from megatron_r1v.data.template import ChatTemplate, TemplateConfig
from megatron_r1v.data.tiling import TilingConfig
from megatron_r1v.platform import destroy_distributed, init_distributed

IMAGE_SIZE, MAX_TILES, PROMPTS_PER_STEP = 56, 4, 4
OPENED = {"count": 0}
_open = PIL.Image.open


def counting_open(*args, **kwargs):
    OPENED["count"] += 1
    return _open(*args, **kwargs)


PIL.Image.open = counting_open  # the tiling modules call Image.open through the module: they see this


def item_row(item) -> dict:
    pixels = item.pixel_values
    return {"id": item.record.id, "tiles": list(item.tiles_per_image), "prompt_ids": item.prompt_ids.tolist(),
            "shape": list(pixels.shape) if pixels is not None else None,
            "sha256": hashlib.sha256(np.ascontiguousarray(pixels.numpy()).tobytes()).hexdigest()
            if pixels is not None and pixels.numel() else None}


def bad_outcomes(args, ctx, template, data_cfg) -> dict:
    """The truncated image under both policies; every rank must end the same way."""
    records = load_records(Path(args.data) / "prompts_bad.jsonl", "prompts", check_images=False).records
    out = {}
    for policy in ("skip", "error"):
        tiling = TilingConfig(image_size=IMAGE_SIZE, max_tiles=MAX_TILES, on_bad_sample=policy)
        tiler, _ = build_replica_tiler(ctx, DataConfig(tiler=data_cfg.tiler, on_bad_sample=policy), tiling)
        loader = PromptLoader(records, template, tiler, seed=0, on_bad_sample=policy)
        try:
            kept = [item.record.id for item in loader.next_batch(len(records))]
            out[policy] = {"kept": kept, "skipped": loader.cursor.skipped}
        except ImageError as err:
            out[policy] = {"error": str(err)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--tiler", default="auto")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    data = Path(args.data)
    opened = {}
    checked = check_images_once(data / "prompts.jsonl", "prompts", ctx)
    records = load_records(data / "prompts.jsonl", "prompts", checked=checked).records
    opened["load"] = OPENED["count"]
    data_cfg = DataConfig(tiler=args.tiler)
    tiling = TilingConfig(image_size=IMAGE_SIZE, max_tiles=MAX_TILES)
    tiler, description = build_replica_tiler(ctx, data_cfg, tiling)
    opened["build"] = OPENED["count"] - sum(opened.values())
    template = ChatTemplate(AutoTokenizer.from_pretrained(str(data / "tok")), TemplateConfig(tokens_per_tile=4))
    loader = PromptLoader(records, template, tiler, seed=7, dp_rank=ctx.dp_rank, dp_size=ctx.dp)
    steps = [[item_row(item) for item in loader.next_batch(PROMPTS_PER_STEP)] for _ in range(args.steps)]
    opened["steps"] = OPENED["count"] - sum(opened.values())
    # The load-time check finds the truncated file (a full decode, on the tiling ranks only) and
    # every rank drops its record (on_bad_sample=skip).
    bad_file = data / "prompts_bad.jsonl"
    kept_at_load = load_records(bad_file, "prompts", "skip", checked=check_images_once(bad_file, "prompts", ctx))
    opened["bad_load"] = OPENED["count"] - sum(opened.values())
    bad = bad_outcomes(args, ctx, template, data_cfg)
    opened["bad"] = OPENED["count"] - sum(opened.values())
    report = {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank,
              "role": tiling_role(ctx.tp_rank, ctx.pp_rank), "description": description,
              "tiler_type": type(getattr(tiler, "tiler", None) or tiler).__name__, "opened": opened,
              "checked": len(checked), "records": len(records), "steps": steps, "bad": bad,
              "kept_at_load": [r.id for r in kept_at_load.records], "skipped_at_load": kept_at_load.skipped,
              "data_seconds": loader.data_seconds}
    (Path(args.out) / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
