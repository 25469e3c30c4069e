"""The parts of ``tools/gpu_check.sh`` that run in Python, one subcommand each.

    python tools/gpu_check.py env                         # device and versions (JSON line)
    python tools/gpu_check.py copy-bw --json F            # device-to-device copy bandwidth
    python tools/gpu_check.py kernel-accuracy --json F    # compiled Triton vs fp32 torch reference
    python tools/gpu_check.py train --backend local --json F [--fp8]   # R1V fwd+bwd tokens/s, MFU
    python tools/gpu_check.py isolation --json F          # packed-row isolation, local backend, CUDA
    python tools/gpu_check.py generate --json F           # HF engine generation tokens/s
    python tools/gpu_check.py junit --xml X --json F      # pytest's junit XML as counts
    python tools/gpu_check.py report --work DIR --out DIR # gpu_check.json + gpu_check_rows.md
    python tools/gpu_check.py nothing --out DIR           # the no-CUDA record

Every number carries its unit in its key (``_ms``, ``_gbps`` = 1e9 bytes/s, ``_tokens_per_s``,
``_tflops`` = 1e12 FLOP/s, ``_frac`` = a fraction of 1, ``_pct`` = percent); ``report`` writes
that legend into the JSON too. The pure helpers (FLOP count, MFU, percentages, the
markdown rows, junit counts) import no torch and are unit-tested on the CPU.

FLOPs of one training step (forward + backward = 3 x forward, a matmul of m x k by k x n =
2 m k n FLOPs), summed over the samples of the step:

* decoder: 6 x (decoder parameters - input embedding) x tokens (the embedding is a lookup; the
  output head is a matmul) + 6 x layers x hidden x s^2 per sample of s tokens (causal QK^T and
  AV: 2 x 2 x s^2 x hidden / 2 forward);
* vision tower: 6 x (vision parameters - patch/position embeddings) x patches per tile
  (1025 at 448 px) + 12 x layers x hidden x patches^2 per tile (full attention);
* adapter: 6 x adapter parameters x visual tokens per tile.

MFU = FLOPs / step time / the device's peak dense bf16 FLOP/s (``PEAK_BF16_TFLOPS``; FP8 runs
are quoted against the same bf16 peak, as Megatron reports them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

TOOLS = Path(__file__).resolve().parent
# Specified dense bf16 tensor-core peak (TFLOP/s) by device-name fragment, first match wins:
# H100 / H200 SXM 989.4 (1979 is with 2:4 sparsity), H100 PCIe 756.5, A100 312.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.5, "H100": 989.4, "H200": 989.4, "A100": 312.0}
KERNEL_SHAPES = [(16384, 19008), (16384, 152064), (32768, 19008), (32768, 152064)]
UNITS = {"_ms": "milliseconds", "_s": "seconds", "_gbps": "GB/s (1e9 bytes per second)",
         "_tokens_per_s": "tokens per second", "_tflops": "TFLOP/s (1e12 FLOP per second)",
         "_frac": "fraction of 1", "_pct": "percent", "_bytes": "bytes", "_flops": "FLOP", "_gib": "GiB (2^30 bytes)"}
PARTS = ("kernels", "train", "isolation", "generate")


# --- pure helpers (no torch) ------------------------------------------------------------------

def pct(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """``value`` as a percentage of ``reference`` (one decimal), None when either is missing."""
    if value is None or not reference:
        return None
    return round(100.0 * value / reference, 1)


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    for fragment, tflops in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return tflops
    return None


def decoder_train_flops(n_params: int, vocab: int, hidden: int, layers: int, lengths: Sequence[int]) -> int:
    """Forward + backward FLOPs of the decoder over samples of ``lengths`` tokens (module doc)."""
    dense = 6 * (n_params - vocab * hidden) * sum(lengths)
    attention = 6 * layers * hidden * sum(s * s for s in lengths)
    return dense + attention


def vision_train_flops(n_params: int, embed_params: int, hidden: int, layers: int, patches: int,
                       tiles: int, adapter_params: int, tokens_per_tile: int) -> int:
    """Forward + backward FLOPs of the vision tower and adapter over ``tiles`` tiles (module doc)."""
    per_tile = 6 * (n_params - embed_params) * patches + 12 * layers * hidden * patches * patches
    return tiles * (per_tile + 6 * adapter_params * tokens_per_tile)


def mfu(flops: float, seconds: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization: achieved FLOP/s over the peak, a fraction of 1 (4 decimals)."""
    if not peak_tflops or seconds <= 0:
        return None
    return round(flops / seconds / (peak_tflops * 1e12), 4)


def md_row(what: str, value: str, command: str, hardware: str, date: str) -> str:
    """One row of docs/benchmarks.md's tables (what | value | command | hardware | date)."""
    cells = [what, value, f"`{command}`" if command else "", hardware, date]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def fmt(value, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):  # 2,400 GB/s, 31.1 %, 1e-06: whole units from 100 up
        value = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"
    return f"{value} {unit}".strip()


def kernel_rows(part: dict, hw: str, date: str) -> list[str]:
    """Rows of the kernels part: per shape, Triton (and Liger) ms, GB/s, % of copy bandwidth, error."""
    cmd = "bash tools/gpu_check.sh (kernels: tools/bench_kernels.py --peak-gbps <copy>)"
    copy = part.get("copy_gbps")
    rows = [md_row("device-to-device copy bandwidth (read + write)", fmt(copy, "GB/s"), cmd, hw, date)]
    accuracy = {(a["T"], a["V"]): a for a in part.get("accuracy", [])}
    for r in part.get("bench", []):
        if r.get("path") != "kernel":
            continue
        acc = accuracy.get((r["T"], r["V"]), {})
        value = (f"Triton fwd {fmt(r.get('fwd_ms'), 'ms')}, fwd+bwd {fmt(r.get('fwd_bwd_ms'), 'ms')}, "
                 f"{fmt(r.get('gbps'), 'GB/s')} ({fmt(pct(r.get('gbps'), copy), '%')} of copy); "
                 f"naive torch fwd+bwd {fmt(r.get('naive_fwd_bwd_ms'), 'ms')}; ")
        if r.get("liger_fwd_bwd_ms"):
            liger_gbps = 3 * r["T"] * r["V"] * 2 / r["liger_fwd_bwd_ms"] / 1e6
            value += (f"Liger fwd+bwd {fmt(r['liger_fwd_bwd_ms'], 'ms')}, {fmt(liger_gbps, 'GB/s')} "
                      f"({fmt(pct(liger_gbps, copy), '%')} of copy), "
                      f"Triton speedup {fmt(r.get('speedup_vs_liger'), 'x')}; ")
        else:
            value += f"Liger: {r.get('liger_note') or 'not measured'}; "
        if acc:
            value += (f"max abs error vs fp32: loss {fmt(acc.get('loss_max_abs_err'))}, logp "
                      f"{fmt(acc.get('logp_max_abs_err'))}, grad {fmt(acc.get('grad_max_abs_err'))} "
                      f"(bound {fmt(acc.get('grad_tol'))}): {'pass' if acc.get('passed') else 'FAIL'}")
        what = f"fused GRPO loss, T={r['T']} x V/tp={r['V']}, {r.get('dtype', 'bf16')}"
        rows.append(md_row(what, value, cmd, hw, date))
    return rows


def train_rows(part: dict, hw: str, date: str) -> list[str]:
    rows = []
    for run in part.get("runs", []):
        what = (f"training throughput, {run.get('model', 'R1V-shaped model')}, fwd+bwd, "
                f"{run.get('backend')}{' + FP8' if run.get('fp8') else ''}, {run.get('dtype', 'bf16')}")
        value = (f"{fmt(run.get('tokens_per_s'), 'tokens/s')}, MFU {fmt(pct(run.get('mfu_frac'), 1.0), '%')} "
                 f"({fmt(run.get('achieved_tflops'), 'TFLOP/s')} of {fmt(run.get('peak_bf16_tflops'), 'TFLOP/s')}; "
                 f"step {fmt(run.get('step_ms'), 'ms')}, {run.get('tokens_per_step')} tokens, "
                 f"peak memory {fmt(run.get('peak_mem_gib'), 'GiB')})")
        rows.append(md_row(what, value, run.get("command", "bash tools/gpu_check.sh"), hw, date))
    for skipped in part.get("skipped", []):
        rows.append(md_row(f"training throughput, {skipped['what']}", f"not measured: {skipped['why']}",
                           "bash tools/gpu_check.sh", hw, date))
    return rows


def isolation_rows(part: dict, hw: str, date: str) -> list[str]:
    rows = []
    local = part.get("local")
    if local:
        verdict = "bit-identical" if local.get("isolated") else "NOT isolated"
        value = (f"{verdict}: other samples {local.get('others_identical')}, padding "
                 f"{local.get('padding_identical')}, changed sample moved {fmt(local.get('changed_max_abs_diff'))}")
        rows.append(md_row(f"packed-row isolation on CUDA, local backend (SegmentAttention), {local.get('dtype')}",
                           value, "bash tools/gpu_check.sh (isolation)", hw, date))
    tests = part.get("pytest")
    if tests:
        value = (f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
                 f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped")
        if tests.get("skip_reasons"):
            value += " (" + "; ".join(sorted(set(tests["skip_reasons"]))) + ")"
        command = "python -m pytest " + " ".join(tests.get("selection", []))
        if tests.get("keyword"):
            command += f" -k \"{tests['keyword']}\""
        rows.append(md_row("CUDA-only tests: " + ", ".join(tests.get("selection", [])), value, command, hw, date))
    return rows


def generate_rows(part: dict, hw: str, date: str) -> list[str]:
    rows = []
    for run in part.get("runs", []):
        value = (f"{fmt(run.get('tokens_per_s'), 'tokens/s')} ({run.get('generated_tokens')} new tokens in "
                 f"{fmt(run.get('seconds_s'), 's')}; batch {run.get('batch')}, "
                 f"{run.get('new_tokens')} new tokens each, prompt {run.get('prompt_tokens')} tokens)")
        rows.append(md_row(f"HF engine generation, {run.get('model')}, {run.get('dtype')}", value,
                           "bash tools/gpu_check.sh (generate)", hw, date))
    return rows


def part_failure_row(name: str, status: dict, hw: str, date: str) -> str:
    why = status.get("status", "missing")
    if why == "timeout":
        why = f"timed out after its budget of {status.get('budget_s')} s"
    elif why == "failed":
        why = f"exited {status.get('rc')} (see gpu_check.log)"
    return md_row(f"gpu_check part {name}", f"no numbers: {why}", "bash tools/gpu_check.sh", hw, date)


def build_rows(report: dict) -> list[str]:
    """docs/benchmarks.md rows of a gpu_check.json, each marked with the device."""
    date = report.get("date", "")
    if not report.get("cuda"):
        return [md_row("gpu_check.sh", report.get("message", "no CUDA device: nothing measured"),
                       "bash tools/gpu_check.sh", f"no CUDA device (host {report.get('host', '?')})", date)]
    hw = f"1x {report.get('device', 'GPU')} (gpu_check.sh)"
    builders = {"kernels": kernel_rows, "train": train_rows, "isolation": isolation_rows, "generate": generate_rows}
    rows = []
    for name in PARTS:
        part = report.get("parts", {}).get(name, {})
        status = part.get("status", {})
        built = builders[name](part, hw, date) if part else []
        if status.get("status") != "ok" or not built:
            built.append(part_failure_row(name, status, hw, date))
        rows.extend(built)
    return rows


def junit_counts(xml_text: str) -> dict:
    """passed / failed / errors / skipped counts and skip reasons of a pytest junit XML."""
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "skip_reasons": [], "failures": []}
    for case in ET.fromstring(xml_text).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = {child.tag for child in case}
        if "failure" in outcome:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif "error" in outcome:
            counts["errors"] += 1
            counts["failures"].append(name)
        elif "skipped" in outcome:
            counts["skipped"] += 1
            counts["skip_reasons"].append(case.find("skipped").get("message", ""))
        else:
            counts["passed"] += 1
    return counts


def units_legend() -> dict:
    return {f"*{suffix}": unit for suffix, unit in UNITS.items()}


# --- measurements (need torch; the GPU ones need CUDA) ----------------------------------------

def environment() -> dict:
    import platform

    import torch

    info = {"cuda": torch.cuda.is_available(), "host": platform.node(), "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "cuda_runtime": torch.version.cuda}}
    for name, module in (("triton", "triton"), ("transformer_engine", "transformer_engine"),
                         ("megatron_core", "megatron.core"), ("transformers", "transformers"),
                         ("liger_kernel", "liger_kernel")):
        info["versions"][name] = _version_of(module)
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    return info


def _version_of(module: str) -> Optional[str]:
    import importlib

    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception as err:  # an optional package may fail in any way when imported
        return f"not importable ({type(err).__name__})"


def cuda_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (CUDA events)."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def copy_bandwidth(gib: float = 1.0, repeats: int = 20) -> dict:
    """Device-to-device copy of ``gib`` GiB, counting the bytes read and written (best of ``repeats``:
    the bandwidth a memory-bound kernel can reach, the reference the kernel rows are quoted against)."""
    import torch

    def measure() -> tuple[float, int]:
        src = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda").normal_()
        dst = torch.empty_like(src)
        best = min(cuda_ms(lambda: dst.copy_(src), 1, warmup=1 if i == 0 else 0) for i in range(repeats))
        return best, 2 * src.numel() * src.element_size()

    best, moved = measure()
    torch.cuda.empty_cache()  # the benchmark runs in a child process next: leave it the memory
    return {"copy_gbps": round(moved / best / 1e6, 1), "copy_ms": round(best, 4), "copy_bytes": moved,
            "how": f"torch copy_ of {gib} GiB bf16, best of {repeats}, read + write"}


def reference_grpo(logits_TV, labels_T, old_T, ref_T, adv_T, mask_T, kl_beta: float):
    """fp32 Eq. 8 + k3 KL as tests/unit/test_kernels.py writes it (log-ratios clamped to +-20),
    autograd for the gradient; returns (loss [T], logp [T])."""
    import torch

    logp_T = torch.log_softmax(logits_TV.float(), dim=-1).gather(1, labels_T[:, None])[:, 0]
    active_T = mask_T != 0
    ratio_T = torch.exp(torch.where(active_T, logp_T - old_T, 0.0).clamp(-20.0, 20.0))
    surrogate_T = torch.maximum(-adv_T * ratio_T, -adv_T * ratio_T.clamp(0.8, 1.2))
    diff_T = torch.where(active_T, ref_T - logp_T, 0.0).clamp(-20.0, 20.0)
    return (surrogate_T + kl_beta * (diff_T.exp() - diff_T - 1)) * mask_T.float(), logp_T


def kernel_accuracy(n_tokens: int, vocab: int, kl_beta: float = 0.04, chunk: int = 2048) -> dict:
    """Compiled Triton GRPO loss (bf16 logits, in place) against the fp32 reference, row chunk by
    row chunk (an fp32 [T, V] reference at T=32768, V=152064 would take 20 GB per copy).
    Bounds: test_kernels.test_triton_cuda_matches_reference's (loss 1e-4 + 1e-5 relative,
    log-probs 1e-4, bf16 gradients 1e-2 of the largest reference gradient)."""
    import torch

    sys.path.insert(0, str(TOOLS))
    from bench_kernels import make_inputs  # the benchmark's inputs: the rows describe the same values

    from megatron_r1v.kernels import grpo_loss

    x = make_inputs(n_tokens, vocab, torch.bfloat16, torch.device("cuda"))
    vectors = [x[k] for k in ("labels", "old", "ref", "adv", "mask")]
    leaf = x["logits"].clone().requires_grad_()
    loss, stats = grpo_loss(leaf, *vectors, kl_beta=kl_beta, backend="triton", inplace=True)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)  # written over leaf's buffer: x["logits"] stays
    worst = {"loss": 0.0, "loss_excess": 0.0, "logp": 0.0, "grad": 0.0, "grad_ref_max": 0.0}
    for lo in range(0, n_tokens, chunk):
        rows = slice(lo, lo + chunk)
        ref_leaf = x["logits"][rows].float().requires_grad_()
        ref_loss, ref_logp = reference_grpo(ref_leaf, *(v[rows] for v in vectors), kl_beta)
        (ref_grad,) = torch.autograd.grad(ref_loss.sum(), ref_leaf)
        loss_err = (loss[rows] - ref_loss.detach()).abs()
        worst["loss"] = max(worst["loss"], float(loss_err.max()))
        worst["loss_excess"] = max(worst["loss_excess"], float((loss_err - 1e-5 * ref_loss.detach().abs()).max()))
        worst["logp"] = max(worst["logp"], float((stats.logprobs[rows] - ref_logp.detach()).abs().max()))
        worst["grad"] = max(worst["grad"], float((grad[rows].float() - ref_grad).abs().max()))
        worst["grad_ref_max"] = max(worst["grad_ref_max"], float(ref_grad.abs().max()))
        del ref_leaf, ref_loss, ref_logp, ref_grad
    grad_tol = max(1e-2 * max(worst["grad_ref_max"], 1e-3), 1e-6)
    passed = worst["loss_excess"] <= 1e-4 and worst["logp"] <= 1e-4 and worst["grad"] <= grad_tol
    return {"T": n_tokens, "V": vocab, "dtype": "bfloat16", "backend": "triton", "kl_beta": kl_beta,
            "loss_max_abs_err": worst["loss"], "logp_max_abs_err": worst["logp"], "grad_max_abs_err": worst["grad"],
            "grad_ref_max_abs": worst["grad_ref_max"], "grad_tol": grad_tol, "loss_tol": "1e-4 + 1e-5 x |ref|",
            "logp_tol": 1e-4, "passed": bool(passed)}


# Sized to one 80 GB GPU with every part training: Qwen2.5-1.5B's decoder shape with R1V's
# 152064-token vocabulary, untied, and InternViT-300M's encoder at 448 px (InternVL2.5-2B's
# pairing), 2.09B parameters. The 38B's shapes need 64 GPUs.
TRAIN_ARCHS = {
    "r1v-2b": dict(decoder=dict(hidden_size=1536, num_layers=28, num_attention_heads=12, num_query_groups=2,
                                ffn_hidden_size=8960, vocab_size=152064, max_position_embeddings=32768),
                   vision=dict(hidden_size=1024, num_layers=24, num_attention_heads=16, ffn_hidden_size=4096)),
    # tiny-r1v-chat's ViT with Qwen2.5-0.5B's decoder: the generation model (HF engine, batch 16).
    "r1v-0.5b-gen": dict(decoder=dict(hidden_size=896, num_layers=24, num_attention_heads=14, num_query_groups=2,
                                      ffn_hidden_size=4864, vocab_size=152064, max_position_embeddings=32768),
                         vision=dict(hidden_size=24, num_layers=2, num_attention_heads=3, ffn_hidden_size=40,
                                     image_size=56)),
}


def resolve_arch(name: str):
    """A preset (``presets.get_preset``) or one of ``TRAIN_ARCHS``."""
    from megatron_r1v.models.r1v.presets import AdapterArch, DecoderArch, R1VArch, VisionArch, get_preset

    if name not in TRAIN_ARCHS:
        return get_preset(name)
    spec = TRAIN_ARCHS[name]
    decoder = DecoderArch(**spec["decoder"])
    return R1VArch(decoder, f"gpu_check {name}", vision=VisionArch(**spec["vision"]), adapter=AdapterArch(),
                   image_token_id=decoder.vocab_size - 1)


def synthetic_rows(arch, samples: int, sample_len: int, tiles: int, rows: int, seed: int = 0) -> list:
    """``rows`` packed rows of ``samples`` SFT samples each: ``sample_len`` tokens holding one image of
    ``tiles`` tiles, the second half of each sample its reply (the loss tokens)."""
    import torch

    from megatron_r1v.data.packing import pack_samples
    from megatron_r1v.data.template import IGNORE_INDEX, EncodedSample

    gen = torch.Generator().manual_seed(seed)
    image_tokens, side = tiles * arch.tokens_per_tile, arch.vision.image_size
    if image_tokens + 8 > sample_len // 2:
        raise SystemExit(f"--sample-len {sample_len} leaves no room for {tiles} tiles ({image_tokens} tokens)")
    packed = []
    for _ in range(rows):
        encoded, pixels = [], []
        for i in range(samples):
            ids = torch.randint(0, arch.image_token_id, (sample_len,), generator=gen)
            ids[4:4 + image_tokens] = arch.image_token_id
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[sample_len // 2:-1] = ids[sample_len // 2 + 1:]
            encoded.append(EncodedSample(f"s{i}", ids, labels, sample_len // 2, (tiles,), image_tokens))
            pixels.append(torch.randn(tiles, 3, side, side, generator=gen))
        packed += pack_samples(encoded, pixels, token_budget=samples * sample_len, pad_id=0)
    return packed


def arch_train_flops(arch, lengths: Sequence[int], tiles: int) -> int:
    """FLOPs of one forward + backward over samples of ``lengths`` tokens and ``tiles`` tiles."""
    dec = arch.decoder
    flops = decoder_train_flops(dec.num_parameters(), dec.vocab_size, dec.hidden_size, dec.num_layers, lengths)
    if arch.vision is not None and tiles:
        vis = arch.vision
        embed = vis.num_channels * vis.patch_size**2 * vis.hidden_size + 2 * vis.hidden_size \
            + vis.num_positions * vis.hidden_size
        flops += vision_train_flops(vis.num_parameters(), embed, vis.hidden_size, vis.num_layers, vis.num_positions,
                                    tiles, arch.parameter_counts()["adapter"], arch.tokens_per_tile)
    return flops


def train_run(args: argparse.Namespace) -> dict:
    """bf16 forward + backward of SFT steps on packed rows through the trainer's own step
    (``trainer.sft_step.sft_forward_backward``, Megatron DDP, every part trainable)."""
    import torch

    from megatron_r1v.config import FP8Config, ModelConfig, ParallelConfig
    from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT
    from megatron_r1v.platform import destroy_distributed, init_distributed
    from megatron_r1v.trainer.schedule import attach_ddp_hooks
    from megatron_r1v.trainer.setup import build_model_stage, wrap_ddp
    from megatron_r1v.trainer.sft_step import make_sft_microbatch, sft_forward_backward

    ctx = init_distributed(ParallelConfig(), force_cpu=args.device == "cpu")
    arch = resolve_arch(args.arch)
    fp8 = FP8Config(format="hybrid") if args.fp8 else FP8Config()
    stage = build_model_stage(arch, ctx, ModelConfig(backend=args.backend, params_dtype=args.dtype, freeze="all",
                                                     fp8=fp8), layout=TRANSFORMERS_LAYOUT)
    ddp = wrap_ddp(stage.model, stage.config)
    attach_ddp_hooks(ddp)
    rows = synthetic_rows(arch, args.samples, args.sample_len, args.tiles, args.rows)
    microbatches = [make_sft_microbatch(row) for row in rows]
    targets = int(sum(float(row.loss_mask.sum()) for row in rows))

    def step() -> None:
        ddp.zero_grad_buffer()
        sft_forward_backward(ddp, microbatches, ctx, targets)

    seconds = timed_steps(step, ctx.device, args.warmup, args.steps)
    tokens = args.rows * args.samples * args.sample_len
    n_samples = args.rows * args.samples
    flops = arch_train_flops(arch, [args.sample_len] * n_samples, n_samples * args.tiles)
    name = torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else "cpu"
    peak = args.peak_tflops or peak_bf16_tflops(name)
    result = {"model": f"{args.arch} ({arch.parameter_counts()['total']:,} parameters)",
              "backend": stage.backend, "fp8": bool(args.fp8), "dtype": args.dtype, "device": name,
              "tokens_per_step": tokens, "tiles_per_step": n_samples * args.tiles,
              "step_ms": round(seconds * 1e3, 2), "tokens_per_s": round(tokens / seconds, 1),
              "flops_per_step_flops": flops, "achieved_tflops": round(flops / seconds / 1e12, 2),
              "peak_bf16_tflops": peak, "mfu_frac": mfu(flops, seconds, peak),
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if name != "cpu" else None,
              "steps_timed": args.steps, "command": "python tools/gpu_check.py train " + " ".join(sys.argv[2:])}
    destroy_distributed(ctx)
    return result


def timed_steps(step: Callable[[], None], device, warmup: int, steps: int) -> float:
    """Mean wall seconds of ``step`` after ``warmup`` untimed ones (synchronized on CUDA)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def isolation_run(dtype: str) -> dict:
    """Packed-row isolation with the local backend on CUDA (the existing test runs the local
    backend on CPU only): change one sample of a packed row, compare every other sample's logits.
    The worker's own row builder and comparison (tests/distributed/workers/packed_isolation_worker.py)."""
    import importlib.util

    import torch

    from megatron_r1v.config import ModelConfig, ParallelConfig
    from megatron_r1v.models.r1v.hf_mapping import TRANSFORMERS_LAYOUT
    from megatron_r1v.models.r1v.presets import get_preset
    from megatron_r1v.platform import destroy_distributed, init_distributed
    from megatron_r1v.trainer.setup import build_model_stage

    path = TOOLS.parent / "tests" / "distributed" / "workers" / "packed_isolation_worker.py"
    spec = importlib.util.spec_from_file_location("packed_isolation_worker", path)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    ctx = init_distributed(ParallelConfig())
    arch = get_preset("tiny-r1v")
    stage = build_model_stage(arch, ctx, ModelConfig(backend="local", params_dtype=dtype), layout=TRANSFORMERS_LAYOUT)
    samples, pixels = worker.make_samples(arch, seed=0)
    before, bounds, order = worker.row_logits(stage, ctx, arch, samples, pixels)
    changed = 2
    other_samples, other_pixels = worker.make_samples(arch, seed=1)
    samples[changed], pixels[changed] = other_samples[changed], other_pixels[changed]
    after, _, _ = worker.row_logits(stage, ctx, arch, samples, pixels)
    others, moved = [], 0.0
    for j, index in enumerate(order):
        span = slice(bounds[j], bounds[j + 1])
        if index == changed:
            moved = float((before[span] - after[span]).abs().max())
        else:
            others.append(bool(torch.equal(before[span], after[span])))
    pad = slice(bounds[len(order)], bounds[-1])
    padding = bool(torch.equal(before[pad], after[pad]))
    destroy_distributed(ctx)
    return {"dtype": dtype, "device": ctx.device.type, "backend": stage.backend, "others_identical": others,
            "padding_identical": padding, "changed_max_abs_diff": moved,
            "isolated": all(others) and padding and moved > 0}


def generate_run(args: argparse.Namespace) -> dict:
    """HF rollout engine (``rollout/hf_engine.py``) generation: ``--batch`` prompts with one image of
    2 tiles each, one sample each, every sample ``--new-tokens`` long (no stop token)."""
    import torch

    from megatron_r1v.rollout.engine import RolloutRequest, SamplingParams
    from megatron_r1v.rollout.hf_engine import HFRolloutEngine

    arch = resolve_arch(args.arch)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    engine = HFRolloutEngine.from_arch(arch, device=args.device, dtype=dtype, attn_implementation=args.attn)
    gen = torch.Generator().manual_seed(0)
    side, per_tile = arch.vision.image_size, arch.tokens_per_tile
    requests = []
    for i in range(args.batch):
        ids = torch.randint(0, arch.image_token_id, (args.prompt_tokens,), generator=gen)
        ids[2:2 + 2 * per_tile] = arch.image_token_id
        requests.append(RolloutRequest(f"p{i}", ids, torch.randn(2, 3, side, side, generator=gen).to(dtype)))
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    engine.generate(requests, SamplingParams(n=1, temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = engine.generate(requests, params)
    sync()
    seconds = time.perf_counter() - start
    generated = sum(int(s.response_ids.numel()) for group in out for s in group)
    return {"model": f"{args.arch} ({arch.parameter_counts()['total']:,} parameters)", "dtype": args.dtype,
            "attn": args.attn, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "generated_tokens": generated, "seconds_s": round(seconds, 3),
            "tokens_per_s": round(generated / seconds, 1)}


# --- records --------------------------------------------------------------------------------

def load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def assemble_report(work: Path, env: dict, date: str) -> dict:
    """gpu_check.json from the parts' files in ``work``: ``<part>.json`` (what the part measured)
    and ``<part>.status.json`` (its exit status, seconds and budget, written by the shell)."""
    report = dict(env, date=date, units=units_legend(), parts={})
    for name in PARTS:
        part = load_json(work / f"{name}.json") or {}
        part["status"] = load_json(work / f"{name}.status.json") or {"status": "missing"}
        report["parts"][name] = part
    return report


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    header = ["<!-- gpu_check.sh rows for docs/benchmarks.md, device: "
              f"{report.get('device', 'none')}, {report.get('date', '')} -->",
              "| what | value | command | hardware | date |", "| --- | --- | --- | --- | --- |"]
    (out / "gpu_check_rows.md").write_text("\n".join(header + build_rows(report)) + "\n")


def nothing_measured(out: Path, date: str, reason: str) -> dict:
    """The record of a machine without CUDA: nothing measured, said so (CI runs this as a smoke test)."""
    import platform

    report = {"cuda": False, "measured": False, "message": f"no CUDA device: nothing measured ({reason})",
              "host": platform.node(), "python": platform.python_version(), "date": date, "parts": {}}
    try:
        import torch

        report["versions"] = {"torch": torch.__version__}
    except ImportError:
        report["versions"] = {"torch": "not importable"}
    write_report(report, out)
    return report


def update_json(path: Path, key: str, value, append: bool = False) -> None:
    """Sets (or appends to the list) ``key`` of the JSON object in ``path``; written after every
    measurement, so a part stopped by its time budget keeps what it had measured."""
    data = load_json(path) or {}
    if append:
        data.setdefault(key, []).append(value)
    else:
        data[key] = value
    path.write_text(json.dumps(data, indent=1) + "\n")


def kernels_part(args: argparse.Namespace) -> int:
    """Copy bandwidth, then tools/bench_kernels.py at the GPU shapes with that bandwidth as its
    peak (its roofline_frac is then the fraction of measured copy bandwidth), then accuracy."""
    import subprocess

    out = Path(args.json)
    copy = copy_bandwidth()
    update_json(out, "copy_gbps", copy["copy_gbps"])
    update_json(out, "copy", copy)
    shapes = ",".join(f"{t}x{v}" for t, v in KERNEL_SHAPES)
    bench_json = out.with_name("bench_kernels.json")
    cmd = [sys.executable, str(TOOLS / "bench_kernels.py"), "--device", "cuda", "--shapes", shapes, "--dtypes", "bf16",
           "--repeats", str(args.repeats), "--warmup", "2", "--peak-gbps", str(copy["copy_gbps"]),
           "--json", str(bench_json)]
    update_json(out, "bench_command", " ".join(cmd[1:]))
    bench = subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=args.bench_timeout)
    update_json(out, "bench", load_json(bench_json) or [])
    update_json(out, "bench_rc", bench.returncode)
    failed = bench.returncode != 0
    for n_tokens, vocab in KERNEL_SHAPES:
        row = kernel_accuracy(n_tokens, vocab)
        print(json.dumps(row), flush=True)
        update_json(out, "accuracy", row, append=True)
        failed |= not row["passed"]
    return 1 if failed else 0


def te_missing() -> Optional[str]:
    import importlib

    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as err:  # TE fails in many ways when its build does not match torch
        return f"transformer_engine not importable ({type(err).__name__}: {err})"[:300]
    return None


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="the part's JSON file (updated in place)")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="device and versions as one JSON line")
    kernels = sub.add_parser("kernels", help="copy bandwidth, bench_kernels.py, accuracy vs fp32")
    add_common(kernels)
    kernels.add_argument("--repeats", type=int, default=5)
    kernels.add_argument("--bench-timeout", type=int, default=600)
    train = sub.add_parser("train", help="forward + backward throughput of an R1V-shaped model")
    add_common(train)
    train.add_argument("--arch", default="r1v-2b", help=f"{', '.join(TRAIN_ARCHS)} or a preset name")
    train.add_argument("--backend", default="local", choices=["local", "te"])
    train.add_argument("--fp8", action="store_true", help="FP8 hybrid (TE only)")
    train.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    train.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    train.add_argument("--samples", type=int, default=8, help="samples per packed row")
    train.add_argument("--sample-len", type=int, default=1024, help="tokens per sample")
    train.add_argument("--tiles", type=int, default=1, help="448-px tiles in each sample's image")
    train.add_argument("--rows", type=int, default=1, help="packed rows (micro-batches) per step")
    train.add_argument("--warmup", type=int, default=2)
    train.add_argument("--steps", type=int, default=5)
    train.add_argument("--peak-tflops", type=float, help="override the device's dense bf16 peak")
    isolation = sub.add_parser("isolation", help="packed-row isolation, local backend, on CUDA")
    add_common(isolation)
    isolation.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    generate = sub.add_parser("generate", help="HF engine generation tokens/s")
    add_common(generate)
    generate.add_argument("--arch", default="r1v-0.5b-gen")
    generate.add_argument("--batch", type=int, default=16)
    generate.add_argument("--prompt-tokens", type=int, default=128)
    generate.add_argument("--new-tokens", type=int, default=256)
    generate.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    generate.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    generate.add_argument("--device", default="cuda")
    junit = sub.add_parser("junit", help="pytest junit XML -> counts in the part's JSON")
    add_common(junit)
    junit.add_argument("--xml", required=True)
    junit.add_argument("--selection", nargs="*", default=[], help="the test files pytest ran")
    junit.add_argument("--keyword", help="pytest's -k expression")
    for name in ("report", "nothing"):
        cmd = sub.add_parser(name, help="gpu_check.json + gpu_check_rows.md" if name == "report" else
                             "the no-CUDA record")
        cmd.add_argument("--out", required=True)
        cmd.add_argument("--work", help="the parts' files (report)")
        cmd.add_argument("--reason", default="torch.cuda.is_available() is False")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    date = time.strftime("%Y-%m-%d")
    if args.command == "env":
        print(json.dumps(environment()))
    elif args.command == "nothing":
        print(nothing_measured(Path(args.out), date, args.reason)["message"])
    elif args.command == "report":
        report = assemble_report(Path(args.work), environment(), date)
        write_report(report, Path(args.out))
        print("\n".join(build_rows(report)))
    elif args.command == "junit":
        counts = junit_counts(Path(args.xml).read_text())
        update_json(Path(args.json), "pytest", dict(counts, selection=args.selection, keyword=args.keyword))
        return 1 if counts["failed"] or counts["errors"] else 0
    else:
        return run_measurement(args)
    return 0


def run_measurement(args: argparse.Namespace) -> int:
    out = Path(args.json)
    if args.command == "kernels":
        return kernels_part(args)
    if args.command == "train":
        missing = te_missing() if args.backend == "te" else None
        if missing:
            update_json(out, "skipped", {"what": "TE" + (" + FP8" if args.fp8 else ""), "why": missing}, append=True)
            print(missing)
            return 0
        run = train_run(args)
        update_json(out, "runs", run, append=True)
    elif args.command == "isolation":
        run = isolation_run(args.dtype)
        update_json(out, "local", run)
    else:
        run = generate_run(args)
        update_json(out, "runs", run, append=True)
    print(json.dumps(run), flush=True)
    return 0 if run.get("isolated", True) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
