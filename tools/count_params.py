"""Parameter count of a preset, computed on the meta device (nothing is allocated).

Builds the real Megatron-Core R1VModel (TP=PP=1) under ``torch.device("meta")`` in a
one-process job, counts parameters by part, and checks them against the closed-form
counts of the preset. Prints one JSON line:

    python tools/count_params.py --preset r1v2-38b
    {"preset": "r1v2-38b", "vision": 5536496000, "adapter": 91786240, "decoder": ..., "total": ..., "total_b": 38.39}
"""

import argparse
import json
import os
import sys

import torch


def count_on_meta(preset: str) -> dict:
    from megatron_r1v.config import ModelConfig, ParallelConfig
    from megatron_r1v.models.r1v.hf_mapping import QWEN2_LAYOUT, TRANSFORMERS_LAYOUT
    from megatron_r1v.models.r1v.presets import get_preset
    from megatron_r1v.platform import LaunchEnv, destroy_distributed, init_distributed
    from megatron_r1v.trainer.setup import build_model_stage

    arch = get_preset(preset)
    env = LaunchEnv.from_environ({k: v for k, v in os.environ.items() if k == "MASTER_PORT"})
    ctx = init_distributed(ParallelConfig(), env=env, force_cpu=True)
    try:
        layout = TRANSFORMERS_LAYOUT if arch.vision is not None else QWEN2_LAYOUT
        model_cfg = ModelConfig(preset=preset, backend="local", freeze="all")
        with torch.device("meta"):
            stage = build_model_stage(arch, ctx, model_cfg, layout=layout, meta_device=True)
        counts = {"vision": 0, "adapter": 0, "decoder": 0}
        part_of = {"vision": "vision", "adapter": "adapter", "language_model": "decoder"}
        for name, param in stage.model.named_parameters():
            assert param.is_meta, f"{name} was allocated on {param.device}"
            counts[part_of[name.split(".", 1)[0]]] += param.numel()
        # Megatron pads the vocabulary (to a multiple of 128 * tp); the released count does not.
        pad_rows = stage.shard_spec.padded_vocab_size - arch.decoder.vocab_size
        counts["decoder"] -= 2 * pad_rows * arch.decoder.hidden_size
        counts["vocab_padding"] = 2 * pad_rows * arch.decoder.hidden_size
    finally:
        destroy_distributed(ctx)
    counts["total"] = counts["vision"] + counts["adapter"] + counts["decoder"]
    expected = arch.parameter_counts()
    counts["matches_closed_form"] = all(counts[k] == expected.get(k, 0) for k in ("vision", "adapter", "decoder"))
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="r1v2-38b")
    args = parser.parse_args(argv)
    counts = count_on_meta(args.preset)
    print(json.dumps({"preset": args.preset, **counts, "total_b": round(counts["total"] / 1e9, 2)}))
    return 0 if counts["matches_closed_form"] else 1


if __name__ == "__main__":
    sys.exit(main())
