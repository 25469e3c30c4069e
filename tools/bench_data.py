"""Benchmark InternVL tiling: DALI (CPU pipeline) against the PIL reference on the same images.

    python tools/bench_data.py [--num 200] [--threads 2] [--batch-size 16] [--e2e-pairs-per-step 16]

Two ratios, PIL time / DALI time: ``kernel_speedup`` (tiling only: ``Tiler.tile_files`` over
all images) and ``e2e_speedup`` (the loader path the MPO trainer takes, with the tilers
``data.tilers.build_tiler`` gives for ``data.tiler=pil`` / ``dali``: the preference records
of the same images -> ``PairLoader.next_batch`` (tiles + chat template with 256 tokens per
tile) -> ``data.packing.pack_pairs`` micro-batches, one step of ``--e2e-pairs-per-step``
pairs after another over all pairs; the packed batches of both are checked to be equal).

Images: ``megatron_r1v.data.synthetic.generate_dataset`` (PNG, 64..900 px, aspect 1:3..4:1)
when that module is importable, else (or with ``--source drawn``) PNGs drawn here with PIL
(gradients and shapes, long side 64..1600 px, aspect 1:4..4:1).

Both backends get ``--threads`` threads: the PIL reference tiles one image per worker
thread (PIL releases the GIL while decoding and resampling, torch while normalizing);
DALI runs its CPU pipeline with that many worker threads, its Python thread only reading
files and headers and feeding the pipeline (outputs come out without a copy). The DALI
backend tiles with the project's ``r1v.internvl_tiles`` operator when it builds
(``--cpu-kernel``); the same run then also times DALI's own operators (``dali_ops_*``). torch's
intra-op pool is set to one thread so neither side gets extra cores from it. After a
warm-up pass over all images (pipeline build, page cache, memory pools) the backends are
timed alternately, ``--repeats`` runs each over all images, and the median run counts. CPU ms per image (all threads of
the process) is reported too: on a shared machine it moves far less than wall time.
The end-to-end path is timed the same way (a warm-up epoch, then alternating runs).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from megatron_r1v.data.tiling import PILTiler, Tiler, TilingConfig


def draw_images(out_dir: Path, num: int, seed: int) -> list[Path]:
    """Fallback data: ellipses and rectangles on a colour ramp, mixed sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num):
        aspect = float(np.exp(rng.uniform(np.log(0.25), np.log(4.0))))
        long_side = int(rng.integers(64, 1601))
        w, h = (long_side, max(16, round(long_side / aspect))) if aspect >= 1 else (max(16, round(long_side * aspect)), long_side)
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)[None, None, :]
        image = Image.fromarray(np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(5, 40))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = [x0, y0, x0 + int(rng.integers(4, max(5, w // 3))), y0 + int(rng.integers(4, max(5, h // 3)))]
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        path = out_dir / f"{i:04d}.png"
        image.save(path)
        paths.append(path)
    return paths


def make_images(work: Path, num: int, seed: int, source: str) -> tuple[list[Path], str]:
    if source == "drawn":
        return draw_images(work / "drawn", num, seed), "drawn"
    try:
        from megatron_r1v.data.synthetic import generate_dataset
    except ImportError:
        if source == "synthetic":
            raise
        return draw_images(work / "drawn", num, seed), "drawn (megatron_r1v.data.synthetic not importable)"
    generate_dataset(work / "synthetic", num, seed)
    paths = sorted((work / "synthetic" / "images").glob("*"))
    if len(paths) != num:
        raise RuntimeError(f"generate_dataset wrote {len(paths)} images under {work / 'synthetic' / 'images'}, expected {num}")
    return paths, "megatron_r1v.data.synthetic.generate_dataset"


def cpu_seconds() -> float:
    """CPU time of this process, all threads: robust to other load on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_backends(tilers: dict[str, Tiler], paths: list[Path], warmup: int,
                  repeats: int) -> dict[str, tuple[float, float]]:
    """Per backend: median wall seconds and median CPU seconds over ``repeats`` runs.

    Each backend first tiles ``warmup`` images untimed (pipeline build, page cache, memory
    pools). Runs alternate between backends so that load from other processes hits both
    alike, and no run's tensors outlive it: every timed run starts from the same memory state.
    """
    for tiler in tilers.values():
        assert tiler.tile_files(paths[:warmup]).num_skipped == 0
    seconds: dict[str, list[float]] = {name: [] for name in tilers}
    cpu: dict[str, list[float]] = {name: [] for name in tilers}
    for r in range(repeats):
        for name, tiler in tilers.items():
            start, start_cpu = time.perf_counter(), cpu_seconds()
            result = tiler.tile_files(paths)
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds() - start_cpu)
            assert result.num_skipped == 0, f"{name} skipped images: {result.skipped}"
            del result
            print(f"[{name}] run {r + 1}/{repeats}: {len(paths)} images in {seconds[name][-1]:.2f} s "
                  f"({len(paths) / seconds[name][-1]:.1f} images/s, "
                  f"{cpu[name][-1] / len(paths) * 1e3:.1f} CPU ms/image)", flush=True)
    return {name: (statistics.median(seconds[name]), statistics.median(cpu[name])) for name in tilers}


def pixel_differences(reference: Tiler, other: Tiler, paths: list[Path], chunk: int = 50) -> tuple[float, float, int]:
    """Max and mean |reference - other| over all tiles (in chunks, to bound memory), and the tile count."""
    max_diff, total, count, tiles = 0.0, 0.0, 0, 0
    for start in range(0, len(paths), chunk):
        a, b = reference.tile_files(paths[start:start + chunk]), other.tile_files(paths[start:start + chunk])
        # Same grids and order by construction; pixels may differ by the resampling implementation.
        assert [i.grid for i in a.kept()] == [i.grid for i in b.kept()], "grids differ between backends"
        for x, y in zip(a.kept(), b.kept()):
            d = (x.pixel_values - y.pixel_values).abs()
            max_diff, total, count, tiles = max(max_diff, float(d.max())), total + float(d.sum()), count + d.numel(), tiles + x.num_tiles
    return max_diff, total / count, tiles


def e2e_data(work: Path, num: int, seed: int) -> Path:
    """The preference records of the synthetic images (generated here when --source drew the images)."""
    prefs = work / "synthetic" / "preferences.jsonl"
    if not prefs.is_file():
        from megatron_r1v.data.synthetic import generate_dataset

        generate_dataset(work / "e2e", num, seed)
        prefs = work / "e2e" / "preferences.jsonl"
    return prefs


class TimedTiler:
    """A tiler that adds up the wall seconds of its ``tile_files`` calls (the e2e path's tiling share)."""

    def __init__(self, tiler: Tiler):
        self.tiler, self.config, self.seconds = tiler, tiler.config, 0.0

    def tile_files(self, paths):
        start = time.perf_counter()
        try:
            return self.tiler.tile_files(paths)
        finally:
            self.seconds += time.perf_counter() - start


def e2e_epoch(tiler: Tiler, records: list, template, pairs_per_step: int, budget: int) -> tuple[int, list]:
    """The trainer's data path over all pairs, step by step: (pairs packed, the first step's micro-batches)."""
    from megatron_r1v.data.loader import PairLoader
    from megatron_r1v.data.packing import pack_pairs

    loader = PairLoader(records, template, tiler, seed=0)
    pairs, first = 0, None
    for _ in range(max(len(records) // pairs_per_step, 1)):
        items = loader.next_batch(pairs_per_step)
        microbatches = pack_pairs(items, budget, pipeline=False)
        pairs += len(items)
        first = microbatches if first is None else first
    return pairs, first


def same_batches(a: list, b: list) -> bool:
    """Packed micro-batches equal field by field (tokens, labels, boundaries, pixels)."""
    fields = ("input_ids", "labels", "cu_seqlens", "pixel_values")
    return len(a) == len(b) and all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b) for f in fields)


def run_e2e(args: argparse.Namespace, work: Path, cfg: TilingConfig) -> dict:
    """``e2e_*`` keys of the report (module docstring)."""
    from transformers import AutoTokenizer

    from megatron_r1v.config import DataConfig
    from megatron_r1v.data.pairs import load_pairs
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tilers import build_tiler
    from megatron_r1v.data.tokenizer import build_tokenizer

    prefs = e2e_data(work, args.num, args.seed)
    build_tokenizer([prefs], 640, work / "tok")
    seq = 2 * 256 * (cfg.max_tiles + 1)  # every image's tokens fit, with room for the text
    template = ChatTemplate(AutoTokenizer.from_pretrained(str(work / "tok")),
                            TemplateConfig(tokens_per_tile=256, max_seq_len=seq))
    records = load_pairs(prefs, "preferences", None).records
    tilers = {name: TimedTiler(build_tiler(DataConfig(tiler=name, tiler_threads=args.threads), cfg).tiler)
              for name in ("pil", "dali")}

    def epoch(name: str) -> tuple[int, list]:
        return e2e_epoch(tilers[name], records, template, args.e2e_pairs_per_step, 2 * seq)

    identical = same_batches(epoch("pil")[1], epoch("dali")[1])  # also the warm-up epoch
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in tilers}  # (wall, CPU, tiling) s
    for r in range(args.repeats):
        for name, tiler in tilers.items():
            tiler.seconds, start, start_cpu = 0.0, time.perf_counter(), cpu_seconds()
            pairs, _ = epoch(name)
            runs[name].append((time.perf_counter() - start, cpu_seconds() - start_cpu, tiler.seconds))
            print(f"[e2e {name}] run {r + 1}/{args.repeats}: {pairs} pairs in {runs[name][-1][0]:.2f} s "
                  f"({pairs / runs[name][-1][0]:.1f} pairs/s, tiling {runs[name][-1][2]:.2f} s)", flush=True)
    (pil_s, pil_cpu, pil_tiling), (dali_s, dali_cpu, dali_tiling) = (
        tuple(statistics.median(run[k] for run in runs[name]) for k in range(3)) for name in ("pil", "dali"))
    return {"e2e_pil_pairs_per_s": round(pairs / pil_s, 2), "e2e_dali_pairs_per_s": round(pairs / dali_s, 2),
            "e2e_speedup": round(pil_s / dali_s, 3), "e2e_pil_cpu_ms_per_pair": round(pil_cpu / pairs * 1e3, 2),
            "e2e_dali_cpu_ms_per_pair": round(dali_cpu / pairs * 1e3, 2),
            "e2e_pil_tiling_share": round(pil_tiling / pil_s, 3),
            "e2e_dali_tiling_share": round(dali_tiling / dali_s, 3),
            "e2e_pairs": pairs, "e2e_pairs_per_step": args.e2e_pairs_per_step, "e2e_identical_batches": identical,
            "e2e_path": "load_pairs -> PairLoader.next_batch (build_tiler + chat template, 256 tokens per tile) "
                        "-> pack_pairs"}


def run_benchmark(args: argparse.Namespace, work: Path) -> dict:
    import nvidia.dali

    from megatron_r1v.data.dali_tiling import DALITiler  # here, so --help works without DALI

    cfg = TilingConfig()
    paths, source = make_images(work, args.num, args.seed, args.source)
    sizes = []
    for p in paths:
        with Image.open(p) as image:
            sizes.append(image.size)
    print(f"{len(paths)} images from {source}; widths {min(w for w, _ in sizes)}..{max(w for w, _ in sizes)}, "
          f"heights {min(h for _, h in sizes)}..{max(h for _, h in sizes)}", flush=True)
    dali_tiler = DALITiler(cfg, num_threads=args.threads, batch_size=args.batch_size, cpu_kernel=args.cpu_kernel)
    tilers: dict[str, Tiler] = {"pil": PILTiler(cfg, num_threads=args.threads), "dali": dali_tiler}
    if dali_tiler.cpu_kernel == "r1v":  # the same run also times DALI's own operators, as a baseline
        tilers["dali_ops"] = DALITiler(cfg, num_threads=args.threads, batch_size=args.batch_size, cpu_kernel="dali")
    timings = time_backends(tilers, paths, args.warmup or len(paths), args.repeats)
    (pil_s, pil_cpu), (dali_s, dali_cpu) = timings["pil"], timings["dali"]
    max_diff, mean_diff, tiles = pixel_differences(tilers["pil"], dali_tiler, paths)
    baseline = {}
    if "dali_ops" in timings:
        ops_s, ops_cpu = timings["dali_ops"]
        baseline = {"dali_ops_images_per_s": round(len(paths) / ops_s, 2), "dali_ops_speedup": round(pil_s / ops_s, 3),
                    "dali_ops_cpu_ms_per_image": round(ops_cpu / len(paths) * 1e3, 2)}
    e2e = run_e2e(args, work, cfg) if args.e2e_pairs_per_step else {}
    return {
        "pil_images_per_s": round(len(paths) / pil_s, 2),
        "dali_images_per_s": round(len(paths) / dali_s, 2),
        "kernel_speedup": round(pil_s / dali_s, 3),
        **e2e,
        "pil_tiles_per_s": round(tiles / pil_s, 1),
        "dali_tiles_per_s": round(tiles / dali_s, 1),
        "pil_cpu_ms_per_image": round(pil_cpu / len(paths) * 1e3, 2),
        "dali_cpu_ms_per_image": round(dali_cpu / len(paths) * 1e3, 2),
        "dali_cpu_kernel": dali_tiler.cpu_kernel,
        **baseline,
        "num_images": len(paths),
        "num_tiles": tiles,
        "threads": args.threads,
        "dali_batch_size": args.batch_size,
        "repeats": args.repeats,
        "images": source,
        "max_abs_diff": round(max_diff, 4),
        "mean_abs_diff": round(mean_diff, 6),
        "dali_version": nvidia.dali.__version__,
        "pillow_version": Image.__version__,
        "torch_version": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=200, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="threads for each backend")
    parser.add_argument("--batch-size", type=int, default=16, help="DALI pipeline batch size")
    parser.add_argument("--cpu-kernel", choices=("auto", "r1v", "dali"), default="auto",
                        help="DALITiler cpu_kernel: the r1v.internvl_tiles operator (auto: when it builds) or DALI's own operators")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend (median counts)")
    parser.add_argument("--warmup", type=int, default=0, help="images each backend tiles before timing (0: all)")
    parser.add_argument("--source", choices=("auto", "synthetic", "drawn"), default="auto",
                        help="images: the synthetic data set (auto: when importable) or PIL drawings")
    parser.add_argument("--work-dir", type=Path, default=None, help="where to write images (default: a temp dir)")
    parser.add_argument("--e2e-pairs-per-step", type=int, default=16,
                        help="pairs per step of the end-to-end (trainer loader) timing, as mpo.pairs_per_step; "
                             "0 skips it")
    args = parser.parse_args(argv)

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
            report = run_benchmark(args, args.work_dir or Path(tmp))
    finally:
        torch.set_num_threads(torch_threads)  # main() is also called in-process by a smoke test
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
