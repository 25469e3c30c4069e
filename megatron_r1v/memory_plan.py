"""Per-GPU memory plan of a run: will this config fit, and what to change if not.

Arithmetic over a :class:`RunConfig`, a GPU count and a GPU size; the architecture is the
run's (:func:`planned_arch`: ``model.checkpoint``'s record, or ``model.preset`` where the
record is not on this machine), and tensor shapes come from the one HF mapping on the
meta device (nothing is allocated). All
sizes in the returned plan are GB = 2**30 bytes. For every pipeline stage (the plan
reports the worst one) it adds:

(a) weights: this rank's parameters in ``model.params_dtype``: decoder layers
    ``num_layers / pp`` per stage, embedding on the first stage, final norm and output
    layer on the last, vocabulary padded as ``ShardSpec`` pads it, InternViT + adapter on
    the first stage with heads padded to a multiple of TP (``vision.padded_heads``), TP
    shards per ``hf_mapping`` split kinds. :func:`stage_tensors` lists them by their
    Megatron names from ``hf_mapping``'s tensor maps (the maps weight loading and sync
    use); tests check them equal to a built model, tensor by tensor.
(b) gradients: fp32 ``main_grad`` for trainable parameters only. Megatron-Core 0.16.1
    ``DistributedDataParallel.__init__`` skips ``not param.requires_grad`` when it collects
    ``params_with_grad``, and ``_ParamAndGradBuffer`` allocates ``grad_data`` of
    ``grad_dtype`` (fp32: ``wrap_ddp`` sets ``grad_reduce_in_fp32``) for those only. Under
    the distributed optimizer the buffer is padded (params to 64 elements, buckets to
    lcm(DP, 128)); that padding (< 0.01 %) is not counted.
(c) optimizer: Adam ``exp_avg`` + ``exp_avg_sq`` (fp32) per trainable element, plus an fp32
    master copy when params are bf16/fp16 (``Float16OptimizerWithFloat16Params``:
    ``param.detach().clone().float()``; ``DistributedOptimizer._build_model_and_main_param_groups``:
    ``shard_model_param.clone().float()``; fp32 params are their own main params). The
    distributed optimizer keeps only this rank's 1/(DP*CP) share of each bucket
    (``optimizer.use_distributed_optimizer``); ``_get_param_groups`` skips frozen params.
(d) activations per micro-batch of ``grpo.micro_batch_tokens`` / ``mpo.micro_batch_tokens``
    packed tokens (by ``train.stage``), after Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models" (arXiv:2205.05198): a GPT layer saves
    ``s*b*h*(34 + 5*a*s/h)`` bytes (fp16), ``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` with TP t,
    ``s*b*h*34/t`` with sequence parallelism plus selective recomputation of core
    attention, ``2*s*b*h/t`` per layer with full recomputation. Their 34 is: two norm
    inputs (4), QKV and fc1 GEMM inputs (4), Q, K, V (6), attention output (2), fc1
    output (8) and fc2 input (8) for a 4h GELU MLP, and two dropout masks (2).
    Re-derived term by term for Qwen2 (see :func:`decoder_layer_bytes`): GQA K/V of
    ``num_query_groups * head_dim``, SwiGLU saving ``2F`` (fc1 out) + ``F`` (fc2 in), no
    dropout. Attention is varlen flash attention on every backend (TE's fused kernel over
    ``cu_seqlens``; the local backend's ``SegmentAttention``, PyTorch's flash kernel per
    sample): it saves Q, K, V, O and a logsumexp instead of the ``a*s^2`` probabilities, so
    the ``5*a*s/h`` term vanishes and selective recomputation (Megatron's default
    ``recompute_modules=["core_attn"]``) saves nothing more (``tools/bench_packing.py``
    measures one layer's attention saves next to this model's; the local backend keeps O
    twice, see :func:`attention_bytes`). Frozen linear layers save no GEMM input
    (Megatron's ``linear_with_frozen_weight``; TE likewise), but activations are still kept
    for the input gradient that must reach the adapter. Full recompute stores a layer group's
    input (``e*h/r`` per token, r = t with SP) and re-runs one group during backward
    (uniform: groups of ``recompute_num_layers``; block: the first ``recompute_num_layers``
    layers of the stage). 1F1B keeps ``pp - stage`` micro-batches in flight (stage 0: pp).
    InternViT (stage 0, never sequence parallel) is modelled the same way with its
    fp32 all-heads q/k norms and layer scales, for ``tiles * 1025`` tokens, only when the
    vision tower trains (a frozen tower with frozen input saves nothing). The loss holds
    ``[tokens, V_pad/t]`` logits in the params dtype plus an fp32 tensor of that shape.
    FP8 (``model.fp8.format``): GEMM inputs are saved in 1 byte (the projection keeps an
    extra 1-byte copy of O) and TE caches fp8 weights and their transposes (2 bytes per
    GEMM weight element): Megatron-Core's TE wrappers pass ``is_first_microbatch`` unless
    ``disable_parameter_transpose_cache``, so the cache lives as long as the modules,
    through the rollout too. A one-layer transient (the gradients of the layer in
    backward) is added on top. Per-token scalars (rstd, logsumexp) are neglected.
    Context parallelism (``parallel.cp``): the decoder and the loss see ``micro_batch_tokens /
    cp`` tokens per rank (the load-balanced split of ``models.r1v.context_parallel``; its
    per-sample padding to 2*cp is counted in the budget by the packer), while InternViT and
    the adapter encode every tile on every CP rank (the split follows the image scatter).
    TE's attention adds, for one layer at a time, the key/value exchange buffers of
    :func:`cp_exchange_bytes`.
(e) GRPO with colocated SGLang (``rollout.engine=sglang``): an engine per DP replica on
    the GPUs of its first stage's TP group, tp = ``parallel.tp``, holding the whole model
    in bf16 / tp; its static pool = engine weights + KV cache of
    ``2 * layers * max(kv_heads/tp, 1) * head_dim * 2`` bytes per token. SGLang sizes the
    pool as ``mem_fraction_static`` times the memory free when it starts (its
    ``profile_max_num_token``: free after loading weights minus ``(1 - fraction)`` x free
    before), and ``trainer/build.py`` starts it after the trainer's weights, gradient
    buffers and fp32 master copies exist (Adam's moments come at the first step). Each
    engine decodes ``prompts_per_step * n_samples / DP`` sequences of up to
    ``train.seq_length`` tokens (or ``max_running_requests``); the plan reports the
    concurrency the pool allows. Timeline: training = weights + grads + optimizer (+ the
    kl_beta reference copy, twice while it is swapped in) + activations + what a
    released engine keeps; rollout = weights + grads + optimizer (the trainer keeps them)
    + the static pool + SGLang's runtime + one weight-sync bucket/tensor; peak = max.
(f) a reserve for CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_r1v.config import RunConfig
from megatron_r1v.models.r1v.model import FREEZE_POLICIES
from megatron_r1v.models.r1v.presets import R1VArch, get_preset
from megatron_r1v.trainer.arch import resolve_arch

GB = 1 << 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Trainable top-level parts per freeze policy.
FREEZE_PARTS = FREEZE_POLICIES
RESERVE_GB = 4.0
"""CUDA context (~0.5), NCCL communicators and buffers of the TP/PP/DP groups (~1.5), fragmentation (~2)."""
CONTEXT_GB = 1.0
"""The trainer process's CUDA context and NCCL communicators (part of RESERVE_GB), already
allocated when a colocated SGLang engine measures the free memory it sizes its pool from."""
SGLANG_RELEASED_GB = 2.0
"""A released (weights + KV freed) colocated SGLang engine: its processes' CUDA context, NCCL, CUDA graphs."""
SGLANG_RUNTIME_GB = 4.0
"""SGLang outside its static pool while decoding: activations, sampling logits, CUDA graph buffers."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    """Stage-local Megatron name (local backend; TE fuses norms into linears with equal sizes)."""
    numel: int
    part: str
    """vision, adapter or language_model."""
    gemm: bool
    """A weight of a (TE) linear layer: cached in fp8 when FP8 is on."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def planned_arch(cfg: RunConfig) -> R1VArch:
    """The architecture the run builds (``trainer.arch.resolve_arch``); a checkpoint whose
    record is not on this machine is planned as ``model.preset``."""
    return resolve_arch(cfg.model, missing_checkpoint_ok=True)


@functools.lru_cache(maxsize=None)
def stage_tensors(arch: "str | R1VArch", tp: int, pp: int, pp_rank: int, divisible_by: int = 128,
                  vocab_pad_tp: int = 8) -> tuple[TensorInfo, ...]:
    """Every parameter of pipeline stage ``pp_rank`` on one TP rank (all TP ranks hold equal
    sizes): the stage's tensor maps (``weights.model_stage_maps``'s names) with the shard
    shapes ``hf_mapping.hf_to_mcore_shard`` builds for loading, computed on meta tensors.
    ``arch``: an architecture, or a preset name."""
    import torch

    from megatron_r1v.checkpoint.hf_layouts import expected_hf_shapes
    from megatron_r1v.models.r1v.hf_mapping import (
        QWEN2_LAYOUT,
        TRANSFORMERS_LAYOUT,
        ShardSpec,
        hf_to_mcore_shard,
        model_tensor_maps,
        stage_tensor_maps,
    )

    arch = get_preset(arch) if isinstance(arch, str) else arch
    layout = QWEN2_LAYOUT if arch.vision is None else TRANSFORMERS_LAYOUT
    hf_shapes = expected_hf_shapes(arch, layout)
    spec = ShardSpec.for_model(arch, tp, divisible_by, vocab_pad_tp)
    maps = stage_tensor_maps(model_tensor_maps(arch, layout), arch.decoder.num_layers, pp_rank, pp,
                             mcore_prefix="language_model.")
    out = []
    for name, tm in maps.items():
        hf = {n: torch.empty(hf_shapes[n], device="meta") for n in tm.hf}
        numel = hf_to_mcore_shard(tm, hf, spec, tp, 0).numel()
        gemm = name.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight"))
        out.append(TensorInfo(name, numel, name.split(".", 1)[0], gemm))
    return tuple(out)


@dataclass(frozen=True)
class ParamBytes:
    """Parameter state of one (pp_rank, tp_rank) in bytes."""

    numel: int
    trainable_numel: int
    weights: int
    grads: int
    optimizer: float
    """Per DP rank: the average share under the distributed optimizer (exact summed over DP)."""
    gemm_numel: int


def param_bytes(cfg: RunConfig, pp_rank: int, tp_rank: int = 0, dp: int = 1) -> ParamBytes:
    """(a)-(c) of the module docstring for one rank; ``dp`` = data-parallel size (CP folded in)."""
    p = cfg.parallel
    if not (0 <= pp_rank < p.pp and 0 <= tp_rank < p.tp):
        raise ValueError(f"rank (pp {pp_rank}, tp {tp_rank}) outside parallel.pp={p.pp} x parallel.tp={p.tp}")
    tensors = stage_tensors(planned_arch(cfg), p.tp, p.pp, pp_rank,
                            cfg.model.make_vocab_size_divisible_by, cfg.model.vocab_pad_tp)
    parts = FREEZE_PARTS[cfg.model.freeze]
    numel = sum(t.numel for t in tensors)
    trainable = sum(t.numel for t in tensors if t.part in parts)
    e = DTYPE_BYTES[cfg.model.params_dtype]
    per_elem = 8 + (4 if cfg.model.params_dtype != "fp32" else 0)
    share = dp if cfg.optimizer.use_distributed_optimizer else 1
    return ParamBytes(numel, trainable, numel * e, trainable * 4, trainable * per_elem / share,
                      sum(t.numel for t in tensors if t.gemm))


# --- activations ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Act:
    """Activation settings shared by the blocks of one plan."""

    e: int  # bytes per activation element (params dtype)
    tp: int
    sp: bool
    fp8: bool
    local: bool  # the local backend: SegmentAttention's output is copied once more (see attention_bytes)

    @property
    def gemm_e(self) -> int:
        return 1 if self.fp8 else self.e


def attention_bytes(e: int, q_width: float, kv_width: float, local: bool) -> float:
    """Bytes per token the core attention saves (varlen flash attention, every backend): Q, K
    and V after RoPE / q-k norms, the output O (the projection's input too) and a per-head
    logsumexp (neglected). The local backend's SegmentAttention concatenates the per-sample
    outputs that each flash call saved, so it keeps O twice (``tools/bench_packing.py``)."""
    return e * (q_width + 2 * kv_width) + e * q_width * (2 if local else 1)


def decoder_layer_bytes(arch: R1VArch, a: _Act, tokens: int, trainable: bool) -> float:
    """Bytes one Qwen2 layer saves for backward for ``tokens`` packed tokens (one row)."""
    d, t = arch.decoder, a.tp
    h, f, kv, e = d.hidden_size, d.ffn_hidden_size, d.num_query_groups * d.head_dim, a.e
    r = t if a.sp else 1  # residual-width tensors are sharded only under sequence parallelism
    per_token = 2 * e * h / r  # inputs of the two RMSNorms
    per_token += attention_bytes(e, h / t, kv / t, a.local)
    per_token += e * 2 * f / t  # fc1 output: SwiGLU input
    if trainable:  # GEMM inputs, needed for weight gradients only
        per_token += 2 * a.gemm_e * h / r + a.gemm_e * f / t  # QKV and fc1 inputs; fc2 input
        per_token += h / t if a.fp8 else 0  # fp8 copy of O as the projection's input
    return per_token * tokens


def vision_layer_bytes(arch: R1VArch, a: _Act, tokens: int, trainable: bool) -> float:
    """Bytes one InternViT layer saves for ``tokens`` = tiles x positions (no SP in the vision block)."""
    v, t, e = arch.vision, a.tp, a.e
    assert v is not None
    h, f = v.hidden_size, v.ffn_hidden_size
    hp = _ceil_div(v.num_attention_heads, t) * v.head_dim  # local width of the padded heads
    per_token = 2 * e * h  # norm inputs
    per_token += 2 * 4 * hp  # fp32 copies inside the all-heads q/k RMSNorms
    per_token += attention_bytes(e, hp, hp, a.local)
    per_token += e * f / t  # fc1 output: GELU input
    if trainable:
        per_token += 2 * a.gemm_e * h + a.gemm_e * f / t  # QKV, fc1 and fc2 inputs
        per_token += 2 * e * hp + 2 * e * h  # normed q/k (norm weights) and ls1/ls2 inputs
        per_token += hp if a.fp8 else 0
    return per_token * tokens


def cp_exchange_bytes(arch: R1VArch, a: _Act, local_tokens: int, cp: int, comm_type: str) -> float:
    """Transient bytes of one layer's context-parallel attention on one rank (``local_tokens``
    = the rank's share of the row). K and V of a token take ``2 * e * kv_width / t`` bytes.
    ``p2p`` (TE's ring): backward holds two K/V blocks in flight (double buffering) and two
    dK/dV blocks, of ``local_tokens`` each (the forward's two K/V blocks are fewer).
    ``all_gather``: the whole row's K and V and their gradients (``cp * local_tokens``).
    ``a2a``: Q, K, V and the output re-laid across ranks, sent and received copies."""
    if cp == 1:
        return 0.0
    d = arch.decoder
    kv = 2 * a.e * d.num_query_groups * d.head_dim / a.tp
    if comm_type == "p2p":
        return 4 * kv * local_tokens
    if comm_type == "all_gather":
        return 2 * kv * cp * local_tokens
    if comm_type == "a2a":
        return 2 * (kv + 2 * a.e * d.num_attention_heads * d.head_dim / a.tp) * local_tokens
    raise ValueError(f"parallel.cp_comm_type must be p2p, all_gather or a2a, got {comm_type!r}")


def _block(cfg: RunConfig, layers: int, full: float, ckpt: float) -> tuple[float, float]:
    """(saved bytes per micro-batch, recompute working set) of ``layers`` layers of ``full`` bytes."""
    m = cfg.model
    if m.recompute_granularity != "full" or layers == 0:
        return layers * full, 0.0
    n = min(m.recompute_num_layers, layers)
    if m.recompute_method == "uniform":
        return _ceil_div(layers, n) * ckpt, n * full
    return n * ckpt + (layers - n) * full, full


def micro_batch_tokens(cfg: RunConfig) -> int:
    return {"grpo": cfg.grpo, "mpo": cfg.mpo, "sft": cfg.sft}[cfg.train.stage].micro_batch_tokens


def default_tiles(cfg: RunConfig, arch: R1VArch) -> int:
    """Tiles per micro-batch: one image of max_tiles (+ thumbnail) per train.seq_length tokens,
    at most micro_batch_tokens / tokens_per_tile (every token an image token)."""
    if arch.vision is None:
        return 0
    tokens = micro_batch_tokens(cfg)
    per_image = cfg.data.max_tiles + 1 if cfg.data.max_tiles > 1 else 1
    return min(tokens // arch.tokens_per_tile, per_image * _ceil_div(tokens, cfg.train.seq_length))


def stage_activations(cfg: RunConfig, pp_rank: int, tiles: int) -> tuple[dict[str, float], int]:
    """Activation bytes of stage ``pp_rank`` by part, and its in-flight micro-batches."""
    arch, p, m = planned_arch(cfg), cfg.parallel, cfg.model
    parts = FREEZE_PARTS[m.freeze]
    a = _Act(DTYPE_BYTES[m.params_dtype], p.tp, p.sequence_parallel, m.fp8.format is not None and m.backend != "local",
             m.backend == "local")
    r = p.tp if p.sequence_parallel else 1
    tokens = micro_batch_tokens(cfg) // p.cp
    h = arch.decoder.hidden_size
    in_flight = p.pp - pp_rank
    lm_trains = "language_model" in parts
    layer = decoder_layer_bytes(arch, a, tokens, lm_trains)
    ckpt = a.e * tokens * h / r
    saved, working = _block(cfg, arch.decoder.num_layers // p.pp, layer, ckpt)
    out = {"decoder": in_flight * saved, "working": working + layer}
    if p.cp > 1:
        out["cp_exchange"] = cp_exchange_bytes(arch, a, tokens, p.cp, p.cp_comm_type)
    out["pipeline"] = in_flight * a.e * tokens * h / r if p.pp > 1 and pp_rank < p.pp - 1 else 0.0
    if pp_rank == 0 and arch.vision is not None:
        v_tokens = tiles * arch.vision.num_positions
        img_tokens = tiles * arch.tokens_per_tile
        n_in = arch.adapter_input_size
        out["adapter"] = in_flight * a.e * img_tokens * (2 * n_in + 2 * h / p.tp)  # LN + fc1 inputs, fc1 out, fc2 in
        if "vision" in parts:
            v_layer = vision_layer_bytes(arch, a, v_tokens, True)
            v_saved, v_work = _block(cfg, arch.vision.num_layers, v_layer, a.e * v_tokens * arch.vision.hidden_size)
            out["vision"] = in_flight * v_saved
            out["working"] = max(out["working"], v_work + v_layer)
    if pp_rank == p.pp - 1:
        vocab_local = arch.decoder.padded_vocab_size(p.tp, m.make_vocab_size_divisible_by, m.vocab_pad_tp) // p.tp
        out["logits"] = tokens * vocab_local * (a.e + 4) + a.e * tokens * h / r * (2 if lm_trains else 1)
    return out, in_flight


# --- the plan ---------------------------------------------------------------------------


@dataclass
class StageMemory:
    """GB per GPU of one pipeline stage (every TP and DP rank of a stage holds the same)."""

    pp_rank: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    reference_gb: float
    """kl_beta > 0: the initial trainable params (x2 while swapped in: training phase)."""
    fp8_cache_gb: float
    activations_gb: float
    activation_parts_gb: dict[str, float]
    in_flight: int
    training_gb: float
    rollout_gb: float


@dataclass
class RolloutMemory:
    """The rollout engine on a GPU of a replica's first stage (GB, tokens, sequences)."""

    engine: str
    weights_gb: float
    """Engine weights per GPU."""
    kv_cache_gb: float
    kv_bytes_per_token: int
    kv_tokens: int
    tokens_per_sequence: int
    sequences_per_engine: int
    concurrency: int
    """Sequences decoded at once (the pool's capacity, capped by the demand and max_running_requests)."""
    waves: int
    static_gb: float
    """mem_fraction_static x free_at_start_gb (sglang); the whole model and cache (hf)."""
    free_at_start_gb: float
    """GPU memory free when the engine starts (what mem_fraction_static applies to)."""
    runtime_gb: float
    released_gb: float
    sync_gb: float


@dataclass
class MemoryPlan:
    """The plan: per-stage numbers, the worst stage's components, phases, peak, verdict, advice (GB)."""

    preset: str
    """The model planned: model.preset, or model.checkpoint when no preset is set."""
    stage: str
    gpus: int
    gpu_mem_gb: float
    tp: int
    pp: int
    cp: int
    dp: int
    micro_batch_tokens: int
    tiles_per_microbatch: int
    stages: list[StageMemory]
    worst_stage: int
    """The stage with the highest peak; weights_gb .. activations_gb are its numbers."""
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    rollout: Optional[RolloutMemory]
    reserve_gb: float
    training_phase_gb: float
    rollout_phase_gb: float
    peak_gb: float
    fits: bool
    advice: list[str] = field(default_factory=list)
    """Config changes (keys and values) with the peak each gives; empty when it fits."""
    problems: list[str] = field(default_factory=list)
    """Why it does not fit."""
    notes: list[str] = field(default_factory=list)
    """Observations that do not decide the fit (e.g. rollout concurrency)."""


def check_layout(cfg: RunConfig, gpus: int) -> int:
    """Data-parallel size; ValueError naming the keys when the GPUs do not split."""
    p = cfg.parallel
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if gpus % (p.tp * p.pp * p.cp):
        raise ValueError(f"{gpus} GPUs are not divisible by parallel.tp*pp*cp = {p.tp}*{p.pp}*{p.cp}")
    return gpus // (p.tp * p.pp * p.cp)


def _trainer_at_engine_start(cfg: RunConfig, dp: int) -> float:
    """Bytes the trainer holds on an engine GPU (stage 0) when the SGLang engine starts:
    ``trainer/build.py`` builds the model, DDP (grad buffers) and the optimizer (fp32 master
    copies) first; torch's Adam allocates its moments at the first step, and the kl_beta
    reference copy comes with the trainer, after the engine."""
    pb = param_bytes(cfg, 0, 0, dp * cfg.parallel.cp)
    share = dp * cfg.parallel.cp if cfg.optimizer.use_distributed_optimizer else 1
    master = pb.trainable_numel * 4 / share if cfg.model.params_dtype != "fp32" else 0
    return pb.weights + pb.grads + master + CONTEXT_GB * GB


def _rollout(cfg: RunConfig, gpu_bytes: float, dp: int) -> RolloutMemory:
    arch, r, p = planned_arch(cfg), cfg.rollout, cfg.parallel
    d = arch.decoder
    total = arch.parameter_counts()["total"]
    seqs = _ceil_div(cfg.grpo.prompts_per_step * r.n_samples, dp)
    seq_tokens = cfg.train.seq_length
    e = DTYPE_BYTES[cfg.model.params_dtype]
    largest = d.padded_vocab_size(p.tp, cfg.model.make_vocab_size_divisible_by, cfg.model.vocab_pad_tp) * d.hidden_size
    if r.engine == "sglang":
        weights, tp, released, runtime = total * 2 / p.tp, p.tp, SGLANG_RELEASED_GB * GB, SGLANG_RUNTIME_GB * GB
        # SGLang sizes its pool from the memory free when it starts (model_runner's profile_max_num_token:
        # free_after_weights - free_at_start * (1 - mem_fraction_static)), i.e. fraction x free - weights.
        free = max(gpu_bytes - _trainer_at_engine_start(cfg, dp), 0.0)
        static = r.mem_fraction_static * free
    else:  # the HF engine: an unsharded transformers model on the replica's owner rank, cache grown per call
        weights, tp, released, runtime, static, free = total * e, 1, 0.0, 0.0, 0.0, 0.0
    kv_per_token = 2 * d.num_layers * max(d.num_query_groups // tp, 1) * d.head_dim * (2 if r.engine == "sglang" else e)
    if r.engine == "sglang":
        kv = max(static - weights, 0.0)
        kv_tokens = int(kv // kv_per_token)
    else:
        kv_tokens = seqs * seq_tokens
        kv = kv_tokens * kv_per_token
        static = weights + kv
    demand = min(seqs, r.max_running_requests or seqs)
    concurrency = min(demand, kv_tokens // seq_tokens)
    sync = 2 * max(r.weight_bucket_mb * 2**20, largest * e)  # gathered largest tensor + one bucket
    return RolloutMemory(r.engine, weights / GB, kv / GB, kv_per_token, kv_tokens, seq_tokens, seqs, concurrency,
                         _ceil_div(seqs, concurrency) if concurrency else 0, static / GB, free / GB,
                         runtime / GB, released / GB, sync / GB)


def _plan(cfg: RunConfig, gpus: int, gpu_mem_gb: float, tiles: Optional[int]) -> MemoryPlan:
    dp = check_layout(cfg, gpus)
    arch, p = planned_arch(cfg), cfg.parallel
    if arch.vision is None:
        tiles = 0
    elif tiles is None:
        tiles = default_tiles(cfg, arch)
    else:  # a given count, capped by what fits in the (possibly changed) micro-batch
        tiles = min(tiles, micro_batch_tokens(cfg) // arch.tokens_per_tile)
    e = DTYPE_BYTES[cfg.model.params_dtype]
    gpu_bytes = gpu_mem_gb * GB
    grpo = cfg.train.stage == "grpo"
    rollout = _rollout(cfg, gpu_bytes, dp) if grpo else None
    fp8 = cfg.model.fp8.format is not None and cfg.model.backend != "local"
    stages = []
    for k in range(p.pp):
        pb = param_bytes(cfg, k, 0, dp * p.cp)
        acts, in_flight = stage_activations(cfg, k, tiles)
        ref = pb.trainable_numel * e if grpo and cfg.grpo.kl_beta > 0 else 0
        fp8_cache = 2 * pb.gemm_numel if fp8 else 0
        resident = pb.weights + pb.grads + pb.optimizer + ref + fp8_cache
        act = sum(acts.values())
        training = resident + ref + act + RESERVE_GB * GB + (rollout.released_gb * GB if rollout else 0)
        rollout_gb = 0.0
        if rollout is not None:
            engine = k == 0  # the replica's engine lives on its first stage's TP group
            extra = (rollout.static_gb + rollout.runtime_gb) * GB if engine else 0.0
            rollout_gb = (resident + extra + rollout.sync_gb * GB + RESERVE_GB * GB) / GB
        stages.append(StageMemory(k, pb.weights / GB, pb.grads / GB, pb.optimizer / GB, ref / GB, fp8_cache / GB,
                                  act / GB, {n: v / GB for n, v in acts.items()}, in_flight, training / GB,
                                  rollout_gb))
    worst = max(stages, key=lambda s: max(s.training_gb, s.rollout_gb))
    training_phase = max(s.training_gb for s in stages)
    rollout_phase = max(s.rollout_gb for s in stages)
    peak = max(training_phase, rollout_phase)
    problems = []
    if peak > gpu_mem_gb:
        problems.append(f"peak {peak:.1f} GB exceeds the GPU's {gpu_mem_gb:g} GB")
    if rollout is not None and rollout.concurrency < 1:
        problems.append(f"the {rollout.engine} KV cache ({rollout.kv_cache_gb:.2f} GB, {rollout.kv_tokens} tokens) "
                        f"cannot hold one sequence of train.seq_length={cfg.train.seq_length} tokens")
    notes = []
    if rollout is not None and rollout.engine == "sglang" and 0 < rollout.concurrency < rollout.sequences_per_engine:
        room = gpu_mem_gb - (rollout_phase - rollout.static_gb)  # largest static pool the rollout phase allows
        fraction = math.floor(min(room / rollout.free_at_start_gb, 0.95) * 100) / 100
        if fraction > cfg.rollout.mem_fraction_static:
            tokens = (fraction * rollout.free_at_start_gb - rollout.weights_gb) * GB // rollout.kv_bytes_per_token
            more = min(rollout.sequences_per_engine, int(tokens // rollout.tokens_per_sequence))
            notes.append(f"rollout: the KV cache holds {rollout.concurrency} of {rollout.sequences_per_engine} "
                         f"sequences per engine at full length ({rollout.waves} waves); "
                         f"rollout.mem_fraction_static={fraction} would hold {more} and still fit")
    if arch.vision is not None and "vision" in FREEZE_PARTS[cfg.model.freeze]:
        notes.append(f"vision activations assume {tiles} tiles per micro-batch (--tiles-per-microbatch; at most "
                     f"{micro_batch_tokens(cfg) // arch.tokens_per_tile} if every token were an image token)")
    label = cfg.model.preset or str(cfg.model.checkpoint)
    return MemoryPlan(label, cfg.train.stage, gpus, gpu_mem_gb, p.tp, p.pp, p.cp, dp,
                      micro_batch_tokens(cfg), tiles, stages, worst.pp_rank, worst.weights_gb, worst.grads_gb,
                      worst.optimizer_gb, worst.activations_gb, rollout, RESERVE_GB, training_phase, rollout_phase,
                      peak, not problems, problems=problems, notes=notes)


def _candidates(cfg: RunConfig, plan: MemoryPlan) -> list[tuple[str, dict]]:
    """Single changes that lower memory, as (description, {dotted key: value})."""
    p, m, out = cfg.parallel, cfg.model, []
    training_bound = plan.training_phase_gb >= plan.rollout_phase_gb
    if training_bound and m.recompute_granularity != "full":
        out.append(("full recomputation", {"model.recompute_granularity": "full", "model.recompute_method": "uniform",
                                           "model.recompute_num_layers": 1}))
    if training_bound and p.tp > 1 and not p.sequence_parallel and m.backend != "local":
        out.append(("sequence parallelism", {"parallel.sequence_parallel": True}))
    key = f"{cfg.train.stage}.micro_batch_tokens"
    if training_bound and plan.micro_batch_tokens // 2 >= cfg.train.seq_length:
        out.append(("a smaller micro-batch", {key: plan.micro_batch_tokens // 2}))
    if not cfg.optimizer.use_distributed_optimizer and plan.dp * p.cp > 1:
        out.append(("the distributed optimizer", {"optimizer.use_distributed_optimizer": True}))
    arch = planned_arch(cfg)
    if arch.decoder.num_layers % (2 * p.pp) == 0 and plan.gpus % (p.tp * 2 * p.pp * p.cp) == 0:
        out.append(("more pipeline stages", {"parallel.pp": 2 * p.pp}))
    try:
        arch.check_parallel(2 * p.tp, p.pp)
        if 2 * p.tp <= 8 and plan.gpus % (2 * p.tp * p.pp * p.cp) == 0:
            out.append(("more tensor parallelism", {"parallel.tp": 2 * p.tp}))
    except ValueError:
        pass
    r = plan.rollout
    if r is not None and r.engine == "hf":
        out.append(("the SGLang engine", {"rollout.engine": "sglang"}))
    if r is not None and r.engine == "sglang" and not training_bound:
        gpu = plan.gpu_mem_gb
        room = gpu - (plan.rollout_phase_gb - r.static_gb)  # static pool that still fits
        need = r.weights_gb + r.kv_bytes_per_token * r.tokens_per_sequence / GB
        if need < room < r.static_gb:
            fraction = math.floor(room / r.free_at_start_gb * 100) / 100
            out.append(("a smaller SGLang pool", {"rollout.mem_fraction_static": fraction}))
    if r is not None and r.engine == "sglang" and r.concurrency < 1:
        out.append(("a larger SGLang pool", {"rollout.mem_fraction_static": min(0.9, cfg.rollout.mem_fraction_static
                                                                                + 0.1)}))
    return out


def with_overrides(cfg: RunConfig, changes: dict) -> RunConfig:
    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        setattr(getattr(new, section), key, value)
    return new


def _fmt(changes: dict) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())


def plan_memory(cfg: RunConfig, gpus: int, gpu_mem_gb: float = 80.0, *,
                tiles_per_microbatch: Optional[int] = None) -> MemoryPlan:
    """The memory plan of ``cfg`` on ``gpus`` GPUs of ``gpu_mem_gb`` GB (see the module docstring).

    When it does not fit, ``advice`` lists config changes with the peak each gives alone,
    then (if none suffices alone) their combination applied in order.
    """
    plan = _plan(cfg, gpus, gpu_mem_gb, tiles_per_microbatch)
    if plan.fits:
        return plan
    combined, applied = cfg, {}
    for what, changes in _candidates(cfg, plan):
        try:
            alone = _plan(with_overrides(cfg, changes), gpus, gpu_mem_gb, tiles_per_microbatch)
        except ValueError:
            continue
        if not alone.fits and alone.peak_gb >= plan.peak_gb - 1e-6:
            continue  # does not help
        plan.advice.append(f"set {_fmt(changes)} ({what}): peak {alone.peak_gb:.1f} GB, "
                           f"{'fits' if alone.fits else 'still too large'}")
        if not _plan(combined, gpus, gpu_mem_gb, tiles_per_microbatch).fits:
            combined = with_overrides(combined, changes)
            applied.update(changes)
    if len(plan.advice) > 1 and not any(a.endswith(", fits") for a in plan.advice):
        together = _plan(combined, gpus, gpu_mem_gb, tiles_per_microbatch)
        verdict = "fits" if together.fits else "still too large: use more GPUs, or train fewer parts (model.freeze)"
        plan.advice.append(f"together: {_fmt(applied)}: peak {together.peak_gb:.1f} GB, {verdict}")
    if not plan.advice:
        plan.advice.append("no single config change found: use more GPUs or GPUs with more memory (--gpu-mem-gb)")
    return plan
