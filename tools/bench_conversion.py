"""Benchmark checkpoint conversion on a synthetic checkpoint with R1V2-38B layer shapes.

Builds an HF (transformers layout, bf16) checkpoint whose every tensor has the shape
of the real R1V2-38B but with few layers and a smaller vocabulary (about 2 GB by
default), imports it under torchrun at --tp/--pp, exports it back, checks the round
trip is bit-exact, and prints one JSON line:

    python tools/bench_conversion.py [--vision-layers 1 --decoder-layers 1 --vocab 32000 --tp 2]
    {"import_s": ..., "export_s": ..., "mb_per_s": ..., "peak_rss_bytes": ..., "largest_tensor_bytes": ...,
     "checkpoint_bytes": ..., "rss_goal_bytes": ..., "meets_rss_goal": ...}

peak_rss_bytes is the largest resident set of any conversion process (import ranks and
the export process); the goal is 2 x largest tensor + 600 MB. A child's ru_maxrss also
counts its parent's peak at the moment it was started (exec records the high-water mark
of the memory it replaces, and Python starts children with vfork), so the synthetic
checkpoint is built in a separate process and this one stays small; launcher_rss_bytes
is its own peak, a floor under every number measured.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def synthetic_checkpoint(directory: Path, vision_layers: int, decoder_layers: int, vocab: int) -> tuple[int, int]:
    from megatron_r1v.checkpoint.conversion import _expected_hf_shapes, _hf_config
    from megatron_r1v.checkpoint.hf_io import ShardedSafetensorsWriter
    from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_FILE_LAYOUT
    from megatron_r1v.models.r1v.presets import get_preset

    real = get_preset("r1v2-38b")
    arch = dataclasses.replace(
        real,
        vision=dataclasses.replace(real.vision, num_layers=vision_layers),
        decoder=dataclasses.replace(real.decoder, num_layers=decoder_layers, vocab_size=vocab),
        image_token_id=vocab - 1,
    )
    directory.mkdir(parents=True)
    shapes = _expected_hf_shapes(arch, TRANSFORMERS_FILE_LAYOUT)
    writer = ShardedSafetensorsWriter(directory, [(n, s, torch.bfloat16) for n, s in shapes.items()], 10**9)
    largest = 0
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        largest = max(largest, tensor.numel() * tensor.element_size())
        writer.add(name, tensor)
    writer.finish()
    (directory / "config.json").write_text(json.dumps(_hf_config(arch, "bf16", "transformers", None)))
    return writer.total_bytes, largest


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and the peak RSS of the command's largest process (its own rusage)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryFile(mode="w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd="/")
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read()[-4000:]}")
    return seconds, usage.ru_maxrss * 1024  # KiB on Linux; max over the process and its waited children


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--decoder-layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-shard-size", default="500MB", help="export shard size (the writer holds one shard)")
    parser.add_argument("--workdir", default=None, help="where to build the checkpoints (default: a temp dir)")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_conversion_"))
    try:
        print(f"building the synthetic checkpoint in {work} ...", file=sys.stderr, flush=True)
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # keeps its memory out of this process
            total, largest = pool.apply(synthetic_checkpoint,
                                        (work / "hf", args.vision_layers, args.decoder_layers, args.vocab))
        launcher_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        convert = str(REPO / "tools" / "convert_checkpoint.py")
        print("import ...", file=sys.stderr, flush=True)
        import_s, import_rss = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={args.tp * args.pp}", convert, "import", "--hf-dir", str(work / "hf"),
                        "--out", str(work / "mcore"), "--tp", str(args.tp), "--pp", str(args.pp), "--dtype", "bf16"])
        print("export ...", file=sys.stderr, flush=True)
        export_s, export_rss = run([sys.executable, convert, "export", "--mcore-dir", str(work / "mcore"), "--out",
                                    str(work / "back"), "--max-shard-size", args.max_shard_size])
        peak = max(import_rss, export_rss)

        from megatron_r1v.checkpoint.hf_io import HFCheckpointReader

        with HFCheckpointReader(work / "hf") as a, HFCheckpointReader(work / "back") as b:
            exact = set(a.names()) == set(b.names()) and all(torch.equal(a.get(n), b.get(n)) for n in a.names())
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    goal = 2 * largest + 600 * 10**6
    print(json.dumps({
        "import_s": round(import_s, 2), "export_s": round(export_s, 2),
        "mb_per_s": round(2 * total / 1e6 / (import_s + export_s), 1),
        "peak_rss_bytes": peak, "import_peak_rss_bytes": import_rss, "export_peak_rss_bytes": export_rss,
        "launcher_rss_bytes": launcher_rss,
        "largest_tensor_bytes": largest, "checkpoint_bytes": total,
        "rss_goal_bytes": goal, "meets_rss_goal": peak <= goal, "round_trip_bit_exact": exact,
        "tp": args.tp, "pp": args.pp,
    }))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
