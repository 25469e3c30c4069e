"""The phase formulas: seconds of each part of one step on ``Workload.gpus`` GPUs.

Rollout (per engine of ``tp`` GPUs, ``B`` sequences decoded at once, mean context c):
  decode iteration  t(B) = max((W + B kv c) / (HBM x decode_bw), 2 N B / tp / (peak x decode_compute))
                           + decode_step_overhead + 2 layers x tp_latency (tp > 1)
    W = decoder bf16 bytes / tp, kv = KV bytes per token per GPU; decode time =
    S x R / B x t(B) + (tail - R) x t(1)  (S sequences per engine, R mean response, the
    tail = max(R, rollout_tail x max_new_tokens): the batch drains to the longest response)
  prefill  = prompts x (2 N p + 2 layers h p^2 + tiles x vision forward) / (tp x peak x prefill_compute)
Reward model: 2 N_rm x tokens / (rm GPUs x peak x prefill_compute); rules: reward_rule_ms each.
Log-prob pass: the training forward's FLOPs / (GPUs x peak x train_compute), bubble included.
Training: FLOPs = 6 N' T + 6 layers h sum s^2 (decoder trains; 4 N' T when only what lies
  before it trains: activation gradients, no weight gradients), + the vision tower and
  adapter, + a recomputed forward; time = FLOPs / (GPUs x peak x train_compute) with the
  GEMMs / fp8_gemm_speedup under FP8, x (1 + (p-1) / (vpp m)) for the pipeline bubble,
  + exposed TP collectives (8 activations of T h per layer, 12 with recompute, (tp-1)/tp
  each, over NVLink) + exposed DP gradient reduce-scatter / param all-gather (or FSDP's
  gathers per micro-batch).
Optimizer: 32 bytes per trainable parameter of the rank's shard / (HBM x optimizer_bw).
Weight sync: bytes per engine GPU / path bandwidth (CUDA IPC, NVLink, InfiniBand, or twice over
  PCIe through the host) + tensors x sync_tensor_overhead; + engine_switch when colocated.
Checkpoint: bytes / storage_gbps / save_interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_r1v.step_time.hardware import GB, Efficiency, GpuSpec
from megatron_r1v.step_time.workload import ModelSpec, Workload


@dataclass(frozen=True)
class Flops:
    """FLOPs of one pass over the batch, GEMM and attention parts apart (FP8 speeds up GEMMs)."""

    gemm: float
    attention: float

    @property
    def total(self) -> float:
        return self.gemm + self.attention


def decoder_forward_flops(m: ModelSpec, tokens: float, sum_sq: float) -> Flops:
    """Forward: 2 FLOPs per non-embedding parameter per token; causal QK^T and AV:
    2 x 2 x s^2 x hidden / 2 per layer per sample of s tokens (``tools/gpu_check.py``)."""
    return Flops(2 * (m.params - m.embed_params) * tokens, 2 * m.layers * m.attention_width * sum_sq)


def vision_forward_flops(m: ModelSpec, tiles: float) -> Flops:
    """Forward of the vision tower (full attention over a tile's patches) and the adapter."""
    if not m.vision_layers or not tiles:
        return Flops(0.0, 0.0)
    p = m.patches_per_tile
    gemm = tiles * (2 * (m.vision_params - m.vision_embed_params) * p + 2 * m.adapter_params * m.tokens_per_tile)
    return Flops(gemm, tiles * 4 * m.vision_layers * m.vision_hidden * p * p)


def _batch(w: Workload) -> tuple[float, float, float]:
    """(tokens, sum of squared sequence lengths, tiles) of the step's training batch."""
    s = w.prompt_tokens + w.response_tokens
    return w.sequences * s, w.sequences * s * s, w.sequences * w.tiles_per_sequence


def train_flops(w: Workload) -> tuple[Flops, Flops]:
    """(model FLOPs, hardware FLOPs incl. recomputation) of forward + backward over the batch."""
    tokens, sum_sq, tiles = _batch(w)
    dec, vis = decoder_forward_flops(w.model, tokens, sum_sq), vision_forward_flops(w.model, tiles)
    lm, vt = "language_model" in w.trains, "vision" in w.trains
    upstream = vt or "adapter" in w.trains  # something before the decoder trains: activation grads flow
    gemm_x = 3.0 if lm else (2.0 if upstream else 1.0)  # fwd + dgrad (+ wgrad)
    attn_x = 3.0 if (lm or upstream) else 1.0
    v_x = 3.0 if vt else 1.0  # a frozen tower is only run forward (nothing before it trains)
    adapter = 2 * w.model.adapter_params * w.model.tokens_per_tile * tiles
    model = Flops(gemm_x * dec.gemm + v_x * (vis.gemm - adapter) + 3 * adapter,
                  attn_x * dec.attention + v_x * vis.attention)
    extra = Flops(0.0, 0.0)
    if w.recompute == "full":
        extra = Flops(dec.gemm + (vis.gemm if vt else 0.0), dec.attention + (vis.attention if vt else 0.0))
    elif w.recompute == "selective":
        extra = Flops(0.0, dec.attention)
    return model, Flops(model.gemm + extra.gemm, model.attention + extra.attention)


def compute_seconds(f: Flops, gpus: int, gpu: GpuSpec, eff: Efficiency, fp8: bool) -> float:
    gemm = f.gemm / (eff.fp8_gemm_speedup if fp8 else 1.0)
    return (gemm + f.attention) / (gpus * gpu.bf16_tflops * 1e12 * eff.train_compute)


def micro_batches(w: Workload) -> int:
    """Micro-batches per data-parallel replica per optimizer step."""
    L = w.layout
    dp = w.gpus // (L.tp * L.pp * L.cp) if L.strategy == "megatron" else w.gpus
    tokens, _, _ = _batch(w)
    per_replica = tokens / dp / w.optimizer_steps
    return max(1, math.ceil(per_replica / (w.micro_batch_tokens / L.cp)))


def bubble_fraction(w: Workload) -> float:
    """Pipeline bubble relative to the ideal time: (p - 1) / (vpp x m)."""
    p = w.layout.pp
    return 0.0 if p == 1 else (p - 1) / (w.layout.vpp * micro_batches(w))


def link_gbps(gpu: GpuSpec, eff: Efficiency, crosses_nodes: bool) -> float:
    return (gpu.ib_gbps * eff.ib_eff if crosses_nodes else gpu.nvlink_gbps * eff.nvlink_eff) * GB


def tp_comm_seconds(w: Workload, gpu: GpuSpec, eff: Efficiency) -> float:
    """Exposed TP collectives of training: per layer, forward 2 all-gathers + 2 reduce-scatters
    (sequence parallel; 2 all-reduces without) of the T x h activations, backward as many again,
    a recomputed forward 4 more; each moves (tp-1)/tp of the tensor per GPU in bf16."""
    L, m = w.layout, w.model
    if L.strategy != "megatron" or L.tp == 1:
        return 0.0
    tokens, _, tiles = _batch(w)
    per_gpu_tokens = tokens / (w.gpus // L.tp)  # each TP group handles its share of the tokens
    n = 12 if w.recompute == "full" else 8
    volume = n * m.layers / L.pp * per_gpu_tokens * m.hidden * 2 * (L.tp - 1) / L.tp
    if m.vision_layers:  # the tower runs on stage 0 only: forward-only when frozen
        v_tokens = tiles / (w.gpus // L.tp) * m.patches_per_tile
        passes = n if "vision" in w.trains else 4
        volume += passes * m.vision_layers * v_tokens * m.vision_hidden * 2 * (L.tp - 1) / L.tp
    return volume / link_gbps(gpu, eff, L.tp > gpu.gpus_per_node) * (1 - eff.tp_overlap)


def _shard_trainable(w: Workload) -> float:
    """Trainable parameters held by one model-parallel rank (before distributed-optimizer sharding)."""
    m = w.model
    n = ((m.params if "language_model" in w.trains else 0.0) + (m.vision_params if "vision" in w.trains else 0.0)
         + (m.adapter_params if "adapter" in w.trains else 0.0))
    return n / (w.layout.tp * w.layout.pp) if w.layout.strategy == "megatron" else n


def dp_comm_seconds(w: Workload, gpu: GpuSpec, eff: Efficiency) -> float:
    """Exposed data-parallel traffic per optimizer step: Megatron reduce-scatters fp32 gradients
    and all-gathers bf16 parameters of the rank's trainable shard (ring: (d-1)/d each);
    FSDP all-gathers the bf16 parameters twice (forward, backward) and reduce-scatters the
    gradients once per micro-batch."""
    L = w.layout
    if L.strategy == "fsdp":
        d = w.gpus
        per_mb = 3 * 2 * w.model.total_params * (d - 1) / d
        steps = micro_batches(w) * w.optimizer_steps
        return steps * per_mb / link_gbps(gpu, eff, d > gpu.gpus_per_node) * (1 - eff.fsdp_overlap)
    dp = w.gpus // (L.tp * L.pp * L.cp)
    if dp * L.cp == 1:
        return 0.0
    d = dp * L.cp
    volume = (4 + 2) * _shard_trainable(w) * (d - 1) / d
    crosses = w.gpus > gpu.gpus_per_node  # DP groups stride across nodes once the job spans several
    return w.optimizer_steps * volume / link_gbps(gpu, eff, crosses) * (1 - eff.dp_overlap)


def optimizer_seconds(w: Workload, gpu: GpuSpec, eff: Efficiency) -> float:
    """Adam is memory-bound: read/write fp32 master, m, v (24 B), read the fp32 grad (4 B),
    write the bf16 weight (2 B), ~32 B per parameter of the rank's shard."""
    shard = _shard_trainable(w)
    if w.layout.strategy == "fsdp":
        shard /= w.gpus
    elif w.layout.distributed_optimizer:
        shard /= max(1, w.gpus // (w.layout.tp * w.layout.pp))
    return w.optimizer_steps * 32 * shard / (gpu.hbm_gbps * GB * eff.optimizer_bw)


def train_seconds(w: Workload, gpu: GpuSpec, eff: Efficiency) -> dict[str, float]:
    """Training phase parts: compute, pipeline bubble, exposed TP and DP traffic, optimizer."""
    _, hw = train_flops(w)
    compute = compute_seconds(hw, w.gpus, gpu, eff, w.fp8)
    parts = {"train_compute": compute, "train_bubble": compute * bubble_fraction(w),
             "train_tp_comm": tp_comm_seconds(w, gpu, eff), "train_dp_comm": dp_comm_seconds(w, gpu, eff),
             "optimizer": optimizer_seconds(w, gpu, eff)}
    return {k: v * w.train_epochs for k, v in parts.items()}


def logprob_seconds(w: Workload, gpu: GpuSpec, eff: Efficiency) -> float:
    """Forward-only passes (old / reference log-probs) on the training layout, bubble included."""
    if not w.logprob_passes:
        return 0.0
    tokens, sum_sq, tiles = _batch(w)
    dec, vis = decoder_forward_flops(w.model, tokens, sum_sq), vision_forward_flops(w.model, tiles)
    f = Flops(dec.gemm + vis.gemm, dec.attention + vis.attention)
    one = compute_seconds(f, w.gpus, gpu, eff, w.fp8) * (1 + bubble_fraction(w))
    return w.logprob_passes * one


@dataclass(frozen=True)
class Decode:
    """The rollout's decode shape per engine."""

    engines: int
    sequences_per_engine: float
    concurrency: int
    """Sequences decoded at once (the KV pool, max_running_requests and the demand cap it)."""
    kv_tokens: float
    tail_tokens: float
    iteration_s: float
    """One decode iteration at full concurrency."""


def kv_bytes_per_token(m: ModelSpec, tp: int) -> float:
    """KV-cache bytes per token on one engine GPU (bf16 K and V; kv heads replicated past tp)."""
    return 2 * m.layers * max(m.kv_heads / tp, 1) * (m.kv_width / m.kv_heads) * 2


def decode_iteration_seconds(w: Workload, gpu: GpuSpec, eff: Efficiency, batch: float) -> float:
    m, tp = w.model, w.rollout.tp
    context = w.prompt_tokens + w.response_tokens / 2
    read = 2 * m.params / tp + batch * kv_bytes_per_token(m, tp) * context
    memory = read / (gpu.hbm_gbps * GB * eff.decode_bw)
    compute = 2 * (m.params - m.embed_params) * batch / tp / (gpu.bf16_tflops * 1e12 * eff.decode_compute)
    latency = 2 * m.layers * eff.tp_latency_us * 1e-6 if tp > 1 else 0.0
    return max(memory, compute) + eff.decode_step_overhead_ms * 1e-3 + latency


def decode_shape(w: Workload, gpu: GpuSpec, eff: Efficiency) -> Decode:
    r, m = w.rollout, w.model
    engines = max(1, (r.gpus or w.gpus) // r.tp)
    per_engine = w.sequences / engines
    kv_tokens = r.kv_tokens
    if kv_tokens is None:  # the engine's static pool: mem_fraction of the GPU minus its weights
        pool = r.mem_fraction * gpu.memory_gb * GB - 2 * m.total_params / r.tp
        kv_tokens = max(pool, 0.0) / kv_bytes_per_token(m, r.tp)
    fit = int(kv_tokens // (w.prompt_tokens + w.response_tokens))
    concurrency = max(1, min(math.ceil(per_engine), r.max_running or math.inf, fit))
    tail = max(w.response_tokens, eff.rollout_tail * w.max_response_tokens)
    return Decode(engines, per_engine, concurrency, kv_tokens, tail,
                  decode_iteration_seconds(w, gpu, eff, concurrency))


def rollout_seconds(w: Workload, gpu: GpuSpec, eff: Efficiency) -> dict[str, float]:
    """Prefill and decode of the step's responses (continuous batching, then the tail)."""
    if w.rollout is None:
        return {}
    d, m, tp = decode_shape(w, gpu, eff), w.model, w.rollout.tp
    steady = d.sequences_per_engine * w.response_tokens / d.concurrency * d.iteration_s
    tail = max(d.tail_tokens - w.response_tokens, 0.0) * decode_iteration_seconds(w, gpu, eff, 1)
    prompts = (w.prompts or w.sequences) if w.rollout.prefix_cache else w.sequences
    p = w.prompt_tokens
    dec = decoder_forward_flops(m, prompts * p, prompts * p * p)
    vis = vision_forward_flops(m, prompts * w.tiles_per_sequence)
    prefill = (dec.total + vis.total) / d.engines / (tp * gpu.bf16_tflops * 1e12 * eff.prefill_compute)
    return {"rollout_prefill": prefill, "rollout_decode": steady + tail}


def reward_seconds(w: Workload, gpu: GpuSpec, eff: Efficiency) -> float:
    """Rule + format rewards, and a reward model's forward over every (prompt, response)."""
    if w.rollout is None:
        return 0.0
    rules = w.sequences * eff.reward_rule_ms * 1e-3
    if not w.reward_model_params:
        return rules
    flops = 2 * w.reward_model_params * w.tokens
    return rules + flops / (max(w.reward_gpus, 1) * gpu.bf16_tflops * 1e12 * eff.prefill_compute)


def weight_sync_seconds(w: Workload, gpu: GpuSpec, eff: Efficiency) -> float:
    """The trainable weights into the engines: (gather across the trainer's stages over the slowest
    link) + the bytes each engine GPU receives over the sync path + a per-tensor cost."""
    if w.rollout is None:
        return 0.0
    m, r = w.model, w.rollout
    trainable = (_shard_trainable(w) * (w.layout.tp * w.layout.pp if w.layout.strategy == "megatron" else 1))
    nbytes = w.sync_bytes if w.sync_bytes is not None else 2 * trainable / r.tp
    # host: the trainer copies to host memory and the engine process back (two PCIe crossings;
    # rollout/engine_process.py, an async engine on GPUs of its own)
    paths = {"ipc": gpu.hbm_gbps * GB * eff.decode_bw, "nvlink": link_gbps(gpu, eff, False),
             "ib": link_gbps(gpu, eff, True), "host": gpu.pcie_gbps * GB * eff.pcie_eff / 2}
    seconds = nbytes / paths[w.sync_path]
    if w.sync_gather:  # every trainer GPU assembles the full tensors it hands over
        seconds += 2 * trainable / link_gbps(gpu, eff, w.gpus > gpu.gpus_per_node)
    tensors = m.tensors if "language_model" in w.trains else 8
    return seconds + tensors * eff.sync_tensor_overhead_ms * 1e-3


def engine_switch_seconds(w: Workload, eff: Efficiency) -> float:
    """A colocated engine releases its memory for training and resumes it for the rollout."""
    return eff.engine_switch_s if w.rollout is not None and not w.rollout.gpus else 0.0


def offload_seconds(w: Workload, gpu: GpuSpec, eff: Efficiency) -> float:
    """Parameters / optimizer state to the host and back between phases (both directions)."""
    return 2 * w.offload_bytes_per_gpu / (gpu.pcie_gbps * GB * eff.pcie_eff)


def checkpoint_seconds(w: Workload, eff: Efficiency) -> float:
    """One save's bytes over the file system's aggregate bandwidth, amortized per step."""
    if not w.checkpoint_interval or not w.checkpoint_bytes:
        return 0.0
    return w.checkpoint_bytes / (eff.storage_gbps * GB) / w.checkpoint_interval
