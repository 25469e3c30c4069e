"""Peak memory and time of tools/assemble_checkpoint.py on synthetic parts with R1V2-38B layer shapes.

Writes a standalone InternViT (InternViT-6B-448px shapes) and a Qwen2 LLM (QwQ-32B
shapes, with a small BPE tokenizer) with few layers and a smaller vocabulary (about 2 GB
in bf16 by default), runs the assembly tool on them in its own process, checks that
every copied tensor is bit-identical, and prints one JSON line:

    python tools/bench_assemble.py [--vision-layers 1 --decoder-layers 1 --vocab 32000]
    {"seconds": ..., "mb_per_s": ..., "peak_rss_bytes": ..., "import_only_rss_bytes": ..., "largest_tensor_bytes": ...,
     "parts_bytes": ..., "rss_goal_bytes": ..., "meets_rss_goal": ..., "bit_exact": ...}

peak_rss_bytes is the tool process's ru_maxrss; import_only_rss_bytes is a process that
only imports the assembly module (the floor every run pays: torch, transformers'
tokenizers). The goal is 2 x largest tensor + 600 MB. The parts are built in a separate
process so this one stays small (a child's ru_maxrss counts its parent's peak at fork).
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def synthetic_parts(work: Path, vision_layers: int, decoder_layers: int, vocab: int) -> tuple[int, int]:
    """(bytes of the parts, bytes of the largest tensor); names from hf_mapping's layouts."""
    from megatron_r1v.checkpoint.assemble import STANDALONE_VISION_LAYOUT
    from megatron_r1v.checkpoint.hf_io import ShardedSafetensorsWriter
    from megatron_r1v.checkpoint.hf_layouts import expected_hf_shapes
    from megatron_r1v.data.tokenizer import TEMPLATE_WORDS, save_hf_tokenizer, train_tokenizer
    from megatron_r1v.models.r1v.hf_config import decoder_arch_to_hf_config, skywork_config
    from megatron_r1v.models.r1v.hf_mapping import (
        INTERNVL_CHAT,
        QWEN2_CAUSAL_LM,
        SKYWORK_LAYOUT,
        decoder_tensor_maps,
        vision_tensor_maps,
    )
    from megatron_r1v.models.r1v.presets import get_preset

    real = get_preset("r1v2-38b")
    arch = dataclasses.replace(real, vision=dataclasses.replace(real.vision, num_layers=vision_layers),
                               decoder=dataclasses.replace(real.decoder, num_layers=decoder_layers, vocab_size=vocab),
                               image_token_id=vocab - 1)
    shapes = expected_hf_shapes(arch, SKYWORK_LAYOUT)
    parts = {
        "vision": [(s, shapes[d]) for src, dst in zip(vision_tensor_maps(arch.vision, STANDALONE_VISION_LAYOUT),
                                                      vision_tensor_maps(arch.vision, SKYWORK_LAYOUT))
                   for s, d in zip(src.hf, dst.hf)],
        "llm": [(s, shapes[d]) for src, dst in zip(decoder_tensor_maps(arch.decoder, QWEN2_CAUSAL_LM),
                                                   decoder_tensor_maps(arch.decoder, INTERNVL_CHAT))
                for s, d in zip(src.hf, dst.hf)],
    }
    total = largest = 0
    gen = torch.Generator().manual_seed(0)
    for part, tensors in parts.items():
        (work / part).mkdir(parents=True)
        writer = ShardedSafetensorsWriter(work / part, [(n, s, torch.bfloat16) for n, s in tensors], 10**9)
        for name, shape in tensors:
            tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            largest = max(largest, tensor.numel() * 2)
            writer.add(name, tensor)
            del tensor
        writer.finish()
        total += writer.total_bytes
    vision_config = {"architectures": ["InternVisionModel"], **skywork_config(arch)["vision_config"]}
    (work / "vision" / "config.json").write_text(json.dumps(vision_config))
    llm_config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "bfloat16",
                  **decoder_arch_to_hf_config(arch.decoder)}
    (work / "llm" / "config.json").write_text(json.dumps(llm_config))
    save_hf_tokenizer(train_tokenizer([TEMPLATE_WORDS], 1024), work / "llm")
    return total, largest


def run(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, the process's peak RSS (its own rusage) and its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-4000:]}")
        return seconds, usage.ru_maxrss * 1024, out.read()  # KiB on Linux


def bit_exact(work: Path, added_ids: list[int]) -> bool:
    """Every tensor of the output equals its source; in the two vocabulary tables, every
    row but the new tokens' (the output is checked here, its memory is not measured)."""
    from megatron_r1v.checkpoint.hf_io import HFCheckpointReader

    with HFCheckpointReader(work / "out") as out, HFCheckpointReader(work / "vision") as vision, \
            HFCheckpointReader(work / "llm") as llm:
        if not all(torch.equal(out.get(f"vision_model.{n}"), vision.get(n)) for n in vision.names()):
            return False
        for name in llm.names():
            got = out.get("language_model.lm_head.weight" if name == "lm_head.weight" else f"language_model.{name}")
            source = llm.get(name)
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                kept = torch.ones(source.shape[0], dtype=torch.bool)
                kept[added_ids] = False
                got, source = got[kept], source[kept]
            if not torch.equal(got, source):
                return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--decoder-layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=32000, help="embedding rows (the tokenizer has 1024 tokens)")
    parser.add_argument("--workdir", default=None, help="where to build the parts (default: a temp dir)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_assemble_"))
    try:
        print(f"building the synthetic parts in {work} ...", file=sys.stderr, flush=True)
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # keeps its memory out of this process
            total, largest = pool.apply(synthetic_parts, (work, args.vision_layers, args.decoder_layers, args.vocab))
        _, floor, _ = run([sys.executable, "-c", "import megatron_r1v.checkpoint.assemble"])
        print("assemble ...", file=sys.stderr, flush=True)
        seconds, peak, stdout = run([sys.executable, str(REPO / "tools" / "assemble_checkpoint.py"), "--vision",
                                     str(work / "vision"), "--llm", str(work / "llm"), "--out", str(work / "out"),
                                     "--max-shard-size", "500MB"])
        report = json.loads(stdout.splitlines()[-1])
        exact = bit_exact(work, list(report["added_tokens"].values()))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    goal = 2 * largest + 600 * 10**6
    print(json.dumps({
        "seconds": round(seconds, 2), "mb_per_s": round(total / 1e6 / seconds, 1), "peak_rss_bytes": peak,
        "import_only_rss_bytes": floor, "largest_tensor_bytes": largest, "parts_bytes": total,
        "rss_goal_bytes": goal, "meets_rss_goal": peak <= goal, "bit_exact": exact,
        "added_tokens": len(report["added_tokens"]), "vocab_rows": report["vocab_rows"],
    }))
    return 0 if exact and peak <= goal else 1


if __name__ == "__main__":
    sys.exit(main())
