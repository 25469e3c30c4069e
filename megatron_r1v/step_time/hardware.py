"""The hardware table and the named efficiency factors of the step-time model.

Every hardware number names its source (a datasheet, or a measurement of this project);
every efficiency factor is a field of :class:`Efficiency` with a default, changed with
``--set efficiency.<name>=<value>`` or a calibration file (:func:`calibrate`) that reads
``tools/gpu_check.sh``'s ``gpu_check.json``. Nothing here is tuned per published run: the
defaults describe Megatron-Core + TE, and a :class:`Framework` profile (another training
stack) changes named factors, each fitted on ONE published row and checked on the others
(``docs/step_time.md`` lists the factors, the profiles and the row that fitted each).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

GB = 1e9  # bandwidths and datasheet memory sizes are decimal (1e9 bytes)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU and the links of the node it sits in (per GPU, one direction)."""

    name: str
    bf16_tflops: float
    """Dense bf16 tensor-core peak (no 2:4 sparsity): what MFU is quoted against."""
    hbm_gbps: float
    memory_gb: float
    nvlink_gbps: float
    """NVLink bandwidth per GPU per direction inside a node."""
    ib_gbps: float
    """Inter-node bandwidth per GPU (one NIC per GPU on DGX/HGX nodes)."""
    pcie_gbps: float
    """Host <-> device (parameter / optimizer offload between phases)."""
    gpus_per_node: int = 8
    source: str = ""


# Datasheet numbers (www.nvidia.com data sheets; NDR InfiniBand 400 Gb/s = 50 GB/s per GPU on
# DGX H100/H200 with one ConnectX-7 per GPU; PCIe Gen5 x16 = 64 GB/s, Gen4 = 32 GB/s).
GPUS: dict[str, GpuSpec] = {
    "h100-sxm": GpuSpec("H100 SXM 80GB", 989.4, 3350.0, 80.0, 450.0, 50.0, 64.0, 8,
                        "NVIDIA H100 datasheet: 989.4 TFLOP/s bf16 dense, 3.35 TB/s HBM3, NVLink 900 GB/s "
                        "bidirectional; DGX H100: 8x ConnectX-7 400 Gb/s"),
    "h200": GpuSpec("H200 SXM 141GB", 989.4, 4800.0, 141.0, 450.0, 50.0, 64.0, 8,
                    "NVIDIA H200 datasheet: 989.4 TFLOP/s bf16 dense, 4.8 TB/s HBM3e, NVLink 900 GB/s"),
    "h20": GpuSpec("H20 96GB", 148.0, 4000.0, 96.0, 450.0, 50.0, 64.0, 8,
                   "NVIDIA H20 product brief: 148 TFLOP/s bf16 dense, 4.0 TB/s, NVLink 900 GB/s"),
    "a100-sxm": GpuSpec("A100 SXM 80GB", 312.0, 2039.0, 80.0, 300.0, 25.0, 32.0, 8,
                        "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense, 2.039 TB/s, NVLink 600 GB/s "
                        "bidirectional; HDR 200 Gb/s per GPU"),
}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peaks, and fixed costs, that the model assumes (defaults
    chosen before comparing with any published run; ``docs/step_time.md`` gives the reasons)."""

    train_compute: float = 0.50
    """Training / log-prob GEMM + attention FLOP/s as a fraction of the bf16 peak (large GEMMs,
    TE / flash attention), before bubbles and exposed communication."""
    fp8_gemm_speedup: float = 1.3
    """GEMM time bf16 / fp8 with Transformer Engine (the 2x peak is not reached end to end)."""
    prefill_compute: float = 0.45
    """Rollout prefill (and reward-model scoring) FLOP/s as a fraction of the bf16 peak."""
    decode_bw: float = 0.60
    """HBM bandwidth a decode iteration reaches (weights + KV cache read once per token)."""
    decode_compute: float = 0.35
    """Decode FLOP/s fraction (large batches: the iteration is compute-bound)."""
    decode_step_overhead_ms: float = 4.0
    """Fixed cost of one decode iteration: scheduling, sampling, launches (SGLang/vLLM with CUDA graphs)."""
    tp_latency_us: float = 10.0
    """One small NVLink all-reduce (two per layer per decode iteration when the engine's tp > 1)."""
    rollout_tail: float = 1.0
    """Longest response / max_new_tokens: a synchronous rollout waits for the longest response,
    and among thousands of samples one is nearly always cut at the cap (see docs/step_time.md)."""
    nvlink_eff: float = 0.70
    ib_eff: float = 0.80
    pcie_eff: float = 0.70
    tp_overlap: float = 0.30
    """Share of the tensor-parallel collectives hidden behind GEMMs."""
    dp_overlap: float = 0.50
    """Share of the data-parallel gradient reduce / parameter gather hidden behind backward."""
    fsdp_overlap: float = 0.50
    """Share of FSDP's per-micro-batch parameter gathers and gradient scatters hidden (prefetch)."""
    optimizer_bw: float = 0.50
    """HBM fraction of the Adam step (memory-bound: ~32 bytes per trainable parameter)."""
    sync_tensor_overhead_ms: float = 0.10
    """Per tensor (or bucket) cost of a weight sync: IPC handle / loader call."""
    engine_switch_s: float = 3.0
    """Colocated engine release + resume (KV pool, CUDA graphs) per step."""
    storage_gbps: float = 10.0
    """Aggregate checkpoint write bandwidth of the shared file system (GB/s)."""
    reward_rule_ms: float = 0.5
    """Rule + format reward per response (math-verify), after the CPU pool's parallelism."""
    decode_of_copy: float = 0.80
    """Used by calibration only: decode_bw = measured copy bandwidth / datasheet HBM x this."""

    def with_overrides(self, changes: dict[str, Any]) -> "Efficiency":
        names = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in names:
                raise ValueError(f"efficiency.{key}: no such factor (known: {', '.join(sorted(names))})")
        values = {k: float(v) for k, v in changes.items()}
        for key, value in values.items():
            if value < 0:
                raise ValueError(f"efficiency.{key} must be >= 0, got {value}")
        return dataclasses.replace(self, **values)


@dataclass(frozen=True)
class Framework:
    """A training stack's efficiency profile: the factors it changes from the defaults (which
    describe Megatron-Core + Transformer Engine), each fitted on exactly ONE published row
    (``fitted_on``) and checked on the others (``validation.py``, ``docs/step_time.md``)."""

    name: str
    factors: dict
    fitted_on: str
    why: str


# Fitted once (bisection on train_compute, every other factor at its default) so that the model's
# verl-FlopsCounter MFU of the EasyR1 Qwen2.5-VL-7B row with micro-batches 4/16 equals the
# published 13.6 % (EasyR1 v0.3.0 assets/baselines.md); the 7B micro 10/20 and 32B rows check it.
FSDP_HF_TRAIN_COMPUTE = 0.220

FRAMEWORKS: dict[str, Framework] = {
    "megatron-te": Framework("megatron-te", {}, "",
                             "Megatron-Core + TE (fused kernels, large GEMMs): the defaults, chosen before any "
                             "comparison; the Megatron-LM GPT-3 rows check them"),
    "fsdp-hf": Framework("fsdp-hf", {"train_compute": FSDP_HF_TRAIN_COMPUTE},
                         "EasyR1 Qwen2.5-VL-7B GRPO, 8 H100, micro 4/16: actor MFU 13.6 %",
                         "HF transformers modules (unfused norms, rotary, SwiGLU; eager python per layer) under "
                         "PyTorch FSDP with gradient checkpointing and 1-10-sequence micro-batches"),
}


def framework_efficiency(name: str, base: Optional["Efficiency"] = None) -> "Efficiency":
    """``base`` (default: the defaults) with the factors of the training stack ``name``."""
    if name not in FRAMEWORKS:
        raise ValueError(f"--framework {name!r} unknown: choose one of {', '.join(FRAMEWORKS)}")
    return (base or Efficiency()).with_overrides(FRAMEWORKS[name].factors)


def gpu_spec(name: str) -> GpuSpec:
    if name not in GPUS:
        raise ValueError(f"--gpu {name!r} unknown: choose one of {', '.join(GPUS)}")
    return GPUS[name]


def _train_runs(report: dict) -> list[dict]:
    return [r for r in report.get("parts", {}).get("train", {}).get("runs", []) if r.get("mfu_frac")]


def calibration_factors(report: dict, gpu: GpuSpec, base: Efficiency) -> dict[str, float]:
    """Factors a ``gpu_check.json`` (``tools/gpu_check.py report``) measures on ``gpu``:

    * ``train_compute`` = the best bf16 ``train`` run's ``mfu_frac`` (one GPU, fwd + bwd of an
      R1V-shaped model: compute efficiency without parallel overheads, which is what it means);
    * ``fp8_gemm_speedup`` = best fp8 / best bf16 ``mfu_frac`` of the same backend;
    * ``decode_bw`` = ``kernels.copy_gbps`` / the datasheet HBM x ``decode_of_copy``.
    A flat ``{"efficiency": {...}}`` object sets factors directly (a hand-written file)."""
    out: dict[str, float] = dict(report.get("efficiency", {}))
    runs = _train_runs(report)
    bf16 = [r for r in runs if not r.get("fp8")]
    if bf16:
        best = max(bf16, key=lambda r: r["mfu_frac"])
        out["train_compute"] = float(best["mfu_frac"])
        fp8 = [r for r in runs if r.get("fp8") and r.get("backend") == best.get("backend")]
        if fp8:
            out["fp8_gemm_speedup"] = max(r["mfu_frac"] for r in fp8) / best["mfu_frac"]
    copy = report.get("parts", {}).get("kernels", {}).get("copy_gbps")
    if copy:
        out["decode_bw"] = float(copy) / gpu.hbm_gbps * base.decode_of_copy
    return out


def calibrate(path: "str | Path", gpu: GpuSpec, base: Efficiency) -> tuple[Efficiency, dict[str, float]]:
    """``base`` with the factors of the calibration file ``path`` (see :func:`calibration_factors`);
    a file measured on another device is an error naming both."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--calibration {path}: no such file") from None
    except ValueError as err:
        raise ValueError(f"--calibration {path}: not JSON ({err})") from None
    device: Optional[str] = report.get("device")
    family = gpu.name.split()[0]
    if device and family not in device:
        raise ValueError(f"--calibration {path} was measured on {device!r}, not on a {gpu.name} (--gpu)")
    factors = calibration_factors(report, gpu, base)
    return base.with_overrides(factors), factors
