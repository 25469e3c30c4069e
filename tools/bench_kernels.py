"""Benchmark the fused GRPO loss kernel against naive torch (and Liger-Kernel when importable).

    python tools/bench_kernels.py [--device cuda|cpu] [--json FILE]

For each shape (T tokens x V/tp vocabulary), dtype and backend it measures forward and
forward+backward time of ``megatron_r1v.kernels.grpo_loss`` (``inplace=True``: the
production setting, backward writes dlogits over the logits buffer), the achieved
bandwidth against the device's memory-bandwidth peak, and, in the same run, the peak
extra memory of the fused path and of the naive torch path (fp32 log_softmax + gather +
clipped loss + k3 KL). One JSON object per shape and backend goes to ``--json`` and, as
a list, to stdout. Each shape also gets a ``"path": "trainer"`` row: the loss called
exactly as the GRPO step calls it (``trainer.grpo_step._grpo_loss_func``, same arguments,
the backend ``auto`` resolves to), with its peak extra memory next to the naive path's.

Bytes moved (the roofline's numerator): forward reads the logits once; backward reads
them again and writes dlogits, so fwd+bwd moves 3 x T x V x element size (the [T]
vectors are negligible). On CPU the peak is a measured large copy (STREAM-like), on
CUDA the device's specified HBM bandwidth. CPU memory comes from torch.profiler's
allocation timeline, CUDA memory from the caching allocator's peak counter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from megatron_r1v.kernels import grpo_loss

GPU_SHAPES = [(t, v) for t in (4096, 16384, 32768) for v in (19008, 38016, 152064)]
CPU_SHAPES = [(1024, 8192), (4096, 8192), (4096, 32000)]
# Specified HBM bandwidth (GB/s) by device-name fragment, for GPUs whose properties do not
# report memory clock and bus width. H100 SXM: 3.35 TB/s; PCIe: 2.0 TB/s; H200: 4.8 TB/s.
GPU_PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2039.0, "H100": 3352.0, "A100": 2039.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_peak_gbps(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        clock_khz = getattr(props, "memory_clock_rate", 0)
        bus_bits = getattr(props, "memory_bus_width", 0)
        if clock_khz and bus_bits:
            return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, f"{props.name}: 2 x memory clock x bus width"
        for fragment, gbps in GPU_PEAK_GBPS.items():
            if fragment in props.name:
                return gbps, f"{props.name}: specified HBM bandwidth"
        raise SystemExit(f"unknown peak bandwidth of {props.name}; pass --peak-gbps")
    # A 256 MiB fp32 copy: read + write bytes over time, best of 5.
    src = torch.empty(1 << 26, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src), device, 1) for _ in range(5))
    return 2 * src.numel() * 4 / best / 1e6, "measured: 256 MiB torch copy, read + write"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int,
          setup: Optional[Callable[[], None]] = None) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs; ``setup`` runs untimed before each."""
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by ``fn`` above what was live when it started."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def measure_in_place(fwd_bwd: Callable[[], object], refresh: Callable[[], None], device: torch.device,
                     args: argparse.Namespace) -> tuple[Optional[int], float]:
    """(peak extra bytes, median ms) of an in-place forward+backward: ``refresh`` restores
    the logits its backward overwrote, untimed, before every run (warm-up included)."""
    for _ in range(args.warmup):
        refresh()
        fwd_bwd()
    refresh()
    peak = peak_extra_bytes(fwd_bwd, device)
    return peak, timed(fwd_bwd, device, args.repeats, setup=refresh)


def make_inputs(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n_tokens, vocab, generator=gen, device=device, dtype=torch.float32).mul_(2).to(dtype)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen, device=device)
    # Behaviour / reference log-probs near a uniform policy's, so ratios spread around 1.
    base = -torch.log(torch.tensor(float(vocab))) - 2.0
    noise = torch.randn(3, n_tokens, generator=gen, device=device)
    return dict(logits=logits, labels=labels, old=base + noise[0], ref=base + noise[1], adv=noise[2],
                mask=(torch.rand(n_tokens, generator=gen, device=device) > 0.1).float())


def naive_grpo(logits, labels, old, ref, adv, mask, beta: float, temperature: float):
    """What a trainer without a fused kernel writes: fp32 log_softmax over [T, V]."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1).gather(1, labels[:, None])[:, 0]
    ratio = torch.exp(logp - old)
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    diff = ref - logp
    return (surrogate + beta * (diff.exp() - diff - 1)) * mask


def bench_shape(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, backends: list[str],
                args: argparse.Namespace, peak_gbps: float) -> list[dict]:
    inputs = make_inputs(n_tokens, vocab, dtype, device)
    pristine = inputs["logits"]
    work = pristine.clone()  # the in-place backward overwrites it; refreshed untimed
    refresh = lambda: work.copy_(pristine)  # noqa: E731
    vectors = (inputs["labels"], inputs["old"], inputs["ref"], inputs["adv"], inputs["mask"])
    beta, temp = args.kl_beta, args.temperature

    def naive_fwd_bwd():
        leaf = pristine.detach().requires_grad_()
        loss = naive_grpo(leaf, *vectors, beta, temp)
        return torch.autograd.grad(loss.sum(), leaf)

    try:
        naive_peak = peak_extra_bytes(naive_fwd_bwd, device)
        naive_ms = timed(naive_fwd_bwd, device, args.repeats)
    except torch.OutOfMemoryError:
        naive_peak, naive_ms = None, None  # reported as null: the naive path does not fit
        torch.cuda.empty_cache()

    liger_ms, liger_note = liger_fwd_bwd_ms(inputs, device, args, refresh_src=pristine)
    rows = []
    for backend in backends:
        def fused_fwd(backend=backend):
            leaf = work.detach().requires_grad_()
            return grpo_loss(leaf, *vectors, kl_beta=beta, temperature=temp, backend=backend, inplace=True)

        def fused_fwd_bwd(backend=backend):
            leaf = work.detach().requires_grad_()
            loss, _ = grpo_loss(leaf, *vectors, kl_beta=beta, temperature=temp, backend=backend, inplace=True)
            return torch.autograd.grad(loss.sum(), leaf)

        fused_peak, fwd_bwd_ms = measure_in_place(fused_fwd_bwd, refresh, device, args)
        # setup=refresh: the timed forward reads logits, not the gradients the previous
        # in-place backward left in the buffer.
        fwd_ms = timed(fused_fwd, device, args.repeats, setup=refresh)
        moved = 3 * n_tokens * vocab * pristine.element_size()
        gbps = moved / fwd_bwd_ms / 1e6
        rows.append(dict(
            path="kernel", T=n_tokens, V=vocab, dtype=str(dtype).replace("torch.", ""), backend=backend,
            device=device.type,
            fwd_ms=round(fwd_ms, 4), fwd_bwd_ms=round(fwd_bwd_ms, 4), gbps=round(gbps, 3),
            roofline_frac=round(gbps / peak_gbps, 4), peak_gbps=round(peak_gbps, 1),
            fused_peak_bytes=fused_peak, naive_peak_bytes=naive_peak,
            fused_to_naive_peak=round(fused_peak / naive_peak, 4) if naive_peak else None,
            naive_fwd_bwd_ms=round(naive_ms, 4) if naive_ms is not None else None,
            liger_fwd_bwd_ms=liger_ms, liger_note=liger_note,
            speedup_vs_liger=round(liger_ms / fwd_bwd_ms, 3) if liger_ms else None,
        ))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rows.append(bench_trainer_path(inputs, work, refresh, device, args, naive_peak, naive_ms))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def bench_trainer_path(inputs: dict, work: torch.Tensor, refresh: Callable[[], None], device: torch.device,
                       args: argparse.Namespace, naive_peak: Optional[int], naive_ms: Optional[float]) -> dict:
    """The loss exactly as the GRPO step calls it: ``trainer.grpo_step._grpo_loss_func`` (the
    function Megatron's schedule runs on the last stage) on a packed row holding the
    ``[1, T, V]`` logits buffer, with the backend the trainer resolves (``auto``)."""
    import types

    from megatron_r1v.data.packing import PackedMicroBatch
    from megatron_r1v.kernels.dispatch import resolve_backend
    from megatron_r1v.losses.grpo import GRPOLossConfig
    from megatron_r1v.trainer.grpo_step import _grpo_loss_func, make_grpo_microbatch

    n_tokens, vocab = work.shape
    labels = inputs["labels"].cpu()
    packed = PackedMicroBatch(labels[None].clone(), labels[None], inputs["mask"].cpu()[None],
                              torch.arange(n_tokens)[None], torch.tensor([0, n_tokens], dtype=torch.int32), None,
                              ["bench"], [0])
    weights = torch.full((n_tokens,), 1.0 / n_tokens)
    batch = {k: v.to(device) for k, v in make_grpo_microbatch(packed, inputs["old"].cpu(), inputs["ref"].cpu(),
                                                               inputs["adv"].cpu(), weights).items()}
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.2, kl_beta=args.kl_beta, temperature=args.temperature)
    ctx = types.SimpleNamespace(tp_group=None)  # one TP rank: the loss function reads only this

    def trainer_fwd_bwd():
        leaf = work.detach().requires_grad_()
        loss, _ = _grpo_loss_func(cfg, ctx, 1.0, [], batch, leaf.view(1, n_tokens, vocab))
        return torch.autograd.grad(loss, leaf)

    peak, fwd_bwd_ms = measure_in_place(trainer_fwd_bwd, refresh, device, args)
    return dict(path="trainer", T=n_tokens, V=vocab, dtype=str(work.dtype).replace("torch.", ""),
                backend=resolve_backend("auto", device), device=device.type, fwd_bwd_ms=round(fwd_bwd_ms, 4),
                fused_peak_bytes=peak, naive_peak_bytes=naive_peak,
                fused_to_naive_peak=round(peak / naive_peak, 4) if naive_peak else None,
                naive_fwd_bwd_ms=round(naive_ms, 4) if naive_ms is not None else None,
                call="megatron_r1v.trainer.grpo_step._grpo_loss_func (inplace fused loss, as the GRPO step runs it)")


def liger_fwd_bwd_ms(inputs: dict, device: torch.device, args: argparse.Namespace,
                     refresh_src: torch.Tensor) -> tuple[Optional[float], Optional[str]]:
    """Liger's ``triton_grpo_loss`` on the same values ([1, T+1, V] logits: it drops the last row)."""
    if device.type != "cuda":
        return None, "Liger-Kernel runs on CUDA only"
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as err:
        return None, f"liger_kernel not importable: {err}"
    n_tokens, vocab = refresh_src.shape
    padded = torch.empty(1, n_tokens + 1, vocab, dtype=refresh_src.dtype, device=device)
    refresh = lambda: padded[0, :n_tokens].copy_(refresh_src)  # noqa: E731
    refresh()
    labels, old, ref, mask = (inputs[k][None] for k in ("labels", "old", "ref", "mask"))
    adv = inputs["adv"][:1]  # Liger takes one advantage per sequence

    def run():
        leaf = padded.detach().requires_grad_()
        loss, _, _ = triton_grpo_loss(leaf, old, ref, labels, adv, mask, temperature=args.temperature,
                                      beta=args.kl_beta, eps_low=0.2, eps_high=0.2, inplace=True,
                                      loss_type="grpo", reduce=False)
        return torch.autograd.grad(loss.sum(), leaf)

    try:
        for _ in range(args.warmup):
            refresh()
            run()
        return round(timed(run, device, args.repeats, setup=refresh), 4), None
    except Exception as err:  # a third-party API change must not lose our own numbers
        return None, f"liger call failed: {type(err).__name__}: {err}"[:300]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(t), int(v)) for t, v in (item.split("x") for item in text.split(","))]
    except ValueError:
        raise SystemExit(f"--shapes must look like 4096x32000,1024x8192; got {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the JSON list to this file")
    parser.add_argument("--shapes", help="TxV list, e.g. 4096x32000,1024x8192 (default: the device's sweep)")
    parser.add_argument("--dtypes", help="comma list of bf16,fp16,fp32 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--backends", help="comma list (default: triton on cuda, torch on cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kl-beta", type=float, default=0.04)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--peak-gbps", type=float, help="override the device's memory-bandwidth peak")
    parser.add_argument("--launch", help="BLOCK_V:num_warps for the Triton kernels (tuning)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    on_gpu = device.type == "cuda"
    shapes = parse_shapes(args.shapes) if args.shapes else (GPU_SHAPES if on_gpu else CPU_SHAPES)
    dtypes = [DTYPES[d] for d in (args.dtypes or ("bf16" if on_gpu else "fp32")).split(",")]
    backends = (args.backends or ("triton" if on_gpu else "torch")).split(",")
    args.repeats = args.repeats or (10 if on_gpu else 3)
    if args.launch:
        from megatron_r1v.kernels import triton_impl

        block, warps = (int(v) for v in args.launch.split(":"))
        triton_impl.launch_config = lambda n_cols: (block, warps)
    peak_gbps, peak_source = (args.peak_gbps, "--peak-gbps") if args.peak_gbps else device_peak_gbps(device)
    print(f"device {device} peak {peak_gbps:.0f} GB/s ({peak_source})", file=sys.stderr, flush=True)

    rows = []
    for n_tokens, vocab in shapes:
        for dtype in dtypes:
            rows.extend(bench_shape(n_tokens, vocab, dtype, device, backends, args, peak_gbps))
            if on_gpu:
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
