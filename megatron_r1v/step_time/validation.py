"""Published measurements next to the model's value for the same configuration.

Each :class:`Published` row is a Workload written from the source's configuration (every
value the source does not state is named in ``assumed``), the published figure, and the
metric compared. :func:`validation_table` recomputes every row with the efficiency factors of
its training stack (``Published.framework``: the defaults for Megatron-Core + TE, or a
``hardware.FRAMEWORKS`` profile whose factors were each fitted on ONE named row and are
checked on the others): nothing is set per row. ``docs/step_time.md`` prints the table and
explains every row outside +-35 %.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_r1v.models.r1v.presets import QWQ_32B, DecoderArch
from megatron_r1v.step_time import phases
from megatron_r1v.step_time.hardware import GPUS, Efficiency, framework_efficiency
from megatron_r1v.step_time.plan import TRAIN_PARTS, predict
from megatron_r1v.step_time.workload import Layout, ModelSpec, Rollout, Workload, decoder_spec

TOLERANCE = 0.35
EASYR1 = "https://github.com/hiyouga/EasyR1/blob/v0.3.0/assets/baselines.md (examples/config.yaml of that version)"
NEMO_RL = "https://github.com/NVIDIA-NeMo/RL/blob/main/docs/about/performance-summary.md (NeMo RL v0.4 table)"
VLLM_MAX_NUM_SEQS = 256
"""vLLM 0.8's default ``max_num_seqs`` (EasyR1 v0.3.0 runs vLLM 0.8.3 and does not set it;
vLLM raised the default to 1024 on >= 70 GB GPUs later: vllm tests/engine/test_arg_utils.py
``test_defaults_with_usage_context``)."""
NEMO_REFIT = ("https://github.com/NVIDIA-NeMo/RL/discussions/1189 (blog 'Journey of Optimizing Weight Transfer', "
              "Table 1)")
VERL_SYNC = ("https://github.com/volcengine/verl/blob/main/recipe/one_step_off_policy/README.md "
             "(Parameter Synchronization)")
MEGATRON = "https://github.com/NVIDIA/Megatron-LM/blob/main/README.md (Performance Benchmarking: strong scaling)"

# Qwen2.5-VL's vision tower (675M parameters with its merger, 32 layers x 1280: the model card);
# a Geometry3k image at EasyR1's min_pixels 262144 is 1337 patches of 14 px -> 334 tokens.
_QWEN25VL_VIT = dict(vision_params=6.75e8, vision_embed_params=1.5e6, vision_layers=32, vision_hidden=1280,
                     patches_per_tile=1337, tokens_per_tile=334)
# Qwen/Qwen2.5-VL-7B-Instruct config.json: hidden 3584, 28 layers, 28 / 4 heads, ffn 18944, vocab 152064.
QWEN25_VL_7B = dataclasses.replace(decoder_spec("Qwen2.5-VL-7B", DecoderArch(3584, 28, 28, 4, 18944, 152064)),
                                   **_QWEN25VL_VIT)
# Qwen2.5-VL-32B's language model has Qwen2.5-32B's shapes (= QwQ-32B's preset).
QWEN25_VL_32B = dataclasses.replace(decoder_spec("Qwen2.5-VL-32B", QWQ_32B), **_QWEN25VL_VIT)
# Qwen/Qwen3-32B model card: 32.8B parameters, 64 layers, 64 Q / 8 KV heads of 128, hidden 5120, vocab 151936.
QWEN3_32B = ModelSpec("Qwen3-32B", 32.8e9, 151936 * 5120, 64, 5120, 1024, 8, tensors=64 * 13 + 3, q_width=8192)
# meta-llama/Llama-3.1-8B config.json: hidden 4096, 32 layers, 32 / 8 heads, ffn 14336, vocab 128256.
LLAMA31_8B = decoder_spec("Llama-3.1-8B", DecoderArch(4096, 32, 32, 8, 14336, 128256))
# Megatron's GPT-3 175B (96 layers x 12288, 96 heads, vocab 131072 per the README's benchmark
# configuration; tied embeddings: the head GEMM is counted, the lookup is not).
GPT3_175B = ModelSpec("GPT-3 175B", 12 * 96 * 12288 ** 2 + 13 * 96 * 12288 + 131072 * 12288, 0.0, 96, 12288,
                      12288, 96)
# DeepSeek-V3: 671B parameters, "over 90 thousand" tensors (the refit blog).
DEEPSEEK_V3 = ModelSpec("DeepSeek-V3 (as dense bytes)", 671e9, 0.0, 61, 7168, 512, 1, tensors=91_000)


@dataclass(frozen=True)
class Published:
    name: str
    gpu: str
    workload: Workload
    metric: str
    """step_s, tokens_per_s_per_gpu, train_mfu, train_mfu_verl (verl's FlopsCounter definition,
    :func:`verl_flops`) or weight_sync_s."""
    published: float
    source: str
    assumed: str
    note: str = ""
    framework: str = "megatron-te"
    """The training stack's efficiency profile (``hardware.FRAMEWORKS``)."""


@dataclass(frozen=True)
class Row:
    name: str
    metric: str
    predicted: float
    published: float
    error: float
    """(predicted - published) / published."""
    within: bool
    source: str
    assumed: str
    note: str
    framework: str


def _easyr1(model: ModelSpec, gpus_tp: int, micro_update: int, tokens_per_gpu_s: float, sec: float) -> Workload:
    """EasyR1 v0.3.0 defaults: rollout_batch_size 512 x n 5, max response 2048, global batch 128
    prompts (x5 = 4 updates), FSDP full shard + gradient checkpointing, vLLM colocated at
    gpu_memory_utilization 0.6, KL loss (reference pass) + old log-probs, params and
    optimizer offloaded between phases. The mean sequence is what the published throughput
    x step time implies (tokens/s/GPU x 8 x seconds / 2560)."""
    seq = tokens_per_gpu_s * 8 * sec / 2560
    prompt = 450.0  # assumed: ~100 text tokens + 334 image tokens
    return Workload(
        name=model.name, model=model, gpus=8, layout=Layout(strategy="fsdp"), sequences=2560,
        prompt_tokens=prompt, response_tokens=seq - prompt, max_response_tokens=2048.0,
        micro_batch_tokens=micro_update * seq, tiles_per_sequence=1.0,
        rollout=Rollout(tp=gpus_tp, mem_fraction=0.6, max_running=VLLM_MAX_NUM_SEQS), prompts=512, logprob_passes=2,
        recompute="full",
        optimizer_steps=4, sync_path="ipc", sync_gather=True, offload_bytes_per_gpu=12 * model.total_params / 8)


def _nemo(model: ModelSpec, gpus: int, gen_tp: int, tp: int, pp: int, seq: float, gen_gpus: int = 0) -> Workload:
    """NeMo RL v0.4 GRPO (OpenMathInstruct-2, Megatron backend): G-GBS 2048, T-GBS 512 (4 optimizer
    steps), T-max 4096. On policy: vLLM colocated at 0.6, refit by CUDA IPC. One step off
    (``gen_gpus`` > 0; recipes async-grpo-*.yaml): vLLM on ``gen_gpus`` GPUs of their own at
    gpu_memory_utilization 0.8, training on ``gpus``, refit by NCCL broadcast across nodes."""
    prompt = 200.0
    rollout = Rollout(tp=gen_tp, mem_fraction=0.8 if gen_gpus else 0.6, gpus=gen_gpus)
    return Workload(
        name=model.name, model=model, gpus=gpus, layout=Layout(tp=tp, pp=pp), sequences=2048,
        prompt_tokens=prompt, response_tokens=seq - prompt, max_response_tokens=4096 - prompt,
        micro_batch_tokens=seq, rollout=rollout, prompts=64, logprob_passes=2, optimizer_steps=4,
        sync_path="ib" if gen_gpus else "ipc", sync_bytes=2 * model.params / gen_tp, sync_gather=pp > 1)


def _gpt3(gpus: int, vpp: int) -> Workload:
    return Workload(name="GPT-3 175B pretraining", model=GPT3_175B, gpus=gpus, layout=Layout(tp=4, pp=8, vpp=vpp),
                    sequences=1152, prompt_tokens=0.0, response_tokens=4096.0, max_response_tokens=4096.0,
                    micro_batch_tokens=4096.0, recompute=None)


_E7 = _easyr1(QWEN25_VL_7B, 2, 4, 1200, 180)
_E7B = _easyr1(QWEN25_VL_7B, 2, 10, 1400, 170)
_E32 = _easyr1(QWEN25_VL_32B, 8, 1, 360, 860)
_EASY_ASSUMED = ("prompt 450 tokens (334 image + ~100 text); mean sequence = published tokens/s x 8 x s / 2560; "
                 "reference + old log-prob passes; offload moves 12 B/param/8 GPUs each way")
_NQ = _nemo(QWEN3_32B, 32, 4, 4, 4, 3206)
_NL = _nemo(LLAMA31_8B, 16, 1, 1, 1, 1060)
_NQ_ASYNC = _nemo(QWEN3_32B, 32, 4, 4, 4, 3207, gen_gpus=32)
_NL_ASYNC = _nemo(LLAMA31_8B, 8, 1, 1, 1, 1129, gen_gpus=8)
_NEMO_ASSUMED = ("64 prompts x 32 samples; prompt 200 tokens; vLLM gpu_memory_utilization 0.6; policy + reference "
                 "log-prob passes; no activation recomputation")
_NEMO_ASYNC_ASSUMED = (_NEMO_ASSUMED.replace("0.6", "0.8 (the async recipes)") + "; generation on 4 / 1 nodes of "
                       "their own, training on the rest; reward and refit serial, as this project's async step")
_DSV3 = Workload(name="DeepSeek-V3 refit", model=DEEPSEEK_V3, gpus=512, layout=Layout(tp=1, pp=8), sequences=1,
                 prompt_tokens=1.0, response_tokens=1.0, max_response_tokens=1.0, micro_batch_tokens=1.0,
                 rollout=Rollout(tp=64, mem_fraction=0.6), sync_path="ipc", sync_bytes=2 * 671e9 / 64,
                 sync_gather=True)
_QWEN25_7B = DecoderArch(3584, 28, 28, 4, 18944, 152064)  # Qwen2.5-Math-7B has Qwen2.5-7B's shapes
_VERL7 = Workload(name="Qwen2.5-Math-7B NCCL sync", model=decoder_spec("Qwen2.5-7B", _QWEN25_7B), gpus=12,
                  layout=Layout(strategy="fsdp"), sequences=1, prompt_tokens=1.0, response_tokens=1.0,
                  max_response_tokens=1.0, micro_batch_tokens=1.0, rollout=Rollout(tp=4, mem_fraction=0.6, gpus=4),
                  sync_path="ib", sync_bytes=2.0 * _QWEN25_7B.num_parameters(), sync_gather=True)

FSDP = "fsdp-hf"
PUBLISHED: tuple[Published, ...] = (
    Published("EasyR1 Qwen2.5-VL-7B GRPO, 8 H100, AMP, micro 4/16", "h100-sxm", _E7, "step_s", 180.0, EASYR1,
              _EASY_ASSUMED, framework=FSDP),
    Published("same", "h100-sxm", _E7, "tokens_per_s_per_gpu", 1200.0, EASYR1, _EASY_ASSUMED,
              "not independent: the token count is derived from the published throughput x time", FSDP),
    Published("same", "h100-sxm", _E7, "train_mfu_verl", 0.136, EASYR1, _EASY_ASSUMED,
              "FITS the fsdp-hf profile's train_compute (0 % by construction)", FSDP),
    Published("EasyR1 Qwen2.5-VL-7B GRPO, 8 H100, AMP, micro 10/20", "h100-sxm", _E7B, "step_s", 170.0, EASYR1,
              _EASY_ASSUMED, framework=FSDP),
    Published("same", "h100-sxm", _E7B, "train_mfu_verl", 0.192, EASYR1, _EASY_ASSUMED, framework=FSDP),
    Published("EasyR1 Qwen2.5-VL-32B GRPO, 8 H100, BF16, micro 1/8, vLLM TP 8", "h100-sxm", _E32, "step_s", 860.0,
              EASYR1, _EASY_ASSUMED, framework=FSDP),
    Published("same", "h100-sxm", _E32, "tokens_per_s_per_gpu", 360.0, EASYR1, _EASY_ASSUMED,
              "not independent (as above)", FSDP),
    Published("same", "h100-sxm", _E32, "train_mfu_verl", 0.112, EASYR1, _EASY_ASSUMED, framework=FSDP),
    Published("NeMo RL v0.4 Qwen3-32B GRPO on-policy, 32 H100, gen TP4, train TP4 PP4", "h100-sxm", _NQ, "step_s",
              393.0, NEMO_RL, _NEMO_ASSUMED),
    Published("same", "h100-sxm", _NQ, "tokens_per_s_per_gpu", 540.0, NEMO_RL, _NEMO_ASSUMED),
    Published("NeMo RL v0.4 Llama-3.1-8B GRPO on-policy, 16 H100, gen TP1, train TP1", "h100-sxm", _NL, "step_s",
              97.7, NEMO_RL, _NEMO_ASSUMED),
    Published("same", "h100-sxm", _NL, "tokens_per_s_per_gpu", 1562.0, NEMO_RL, _NEMO_ASSUMED),
    Published("NeMo RL v0.4 Qwen3-32B GRPO 1-step off, 32 gen + 32 train H100, gen TP4, train TP4 PP4", "h100-sxm",
              _NQ_ASYNC, "step_s", 215.0, NEMO_RL, _NEMO_ASYNC_ASSUMED,
              "NeMo's in-flight weight updates (async-grpo-qwen3-32b-8n8g.yaml) hide part of the refit"),
    Published("same", "h100-sxm", _NQ_ASYNC, "tokens_per_s_per_gpu", 494.0, NEMO_RL, _NEMO_ASYNC_ASSUMED),
    Published("NeMo RL v0.4 Llama-3.1-8B GRPO 1-step off, 8 gen + 8 train H100, gen TP1, train TP1", "h100-sxm",
              _NL_ASYNC, "step_s", 74.6, NEMO_RL, _NEMO_ASYNC_ASSUMED),
    Published("same", "h100-sxm", _NL_ASYNC, "tokens_per_s_per_gpu", 2161.0, NEMO_RL, _NEMO_ASYNC_ASSUMED),
    Published("NeMo RL v0.3 refit, DeepSeek-V3, train EP64 PP8 -> gen TP64", "h100-sxm", _DSV3, "weight_sync_s", 47.2,
              NEMO_REFIT, "512 H100; bf16 weights gathered over InfiniBand by every trainer GPU; 91,000 tensors",
              "an MoE model: only its bytes and tensor count enter the sync formula"),
    Published("verl one-step-off NCCL weight sync, Qwen2.5-Math-7B, 12 train + 4 rollout H20", "h20", _VERL7,
              "weight_sync_s", 0.3, VERL_SYNC, "FSDP2 full_tensor gather + broadcast both over InfiniBand",
              "published as an upper bound ('at most of time, the latency is under 300ms')", FSDP),
    Published("Megatron-LM GPT-3 175B, 96 H100 (strong scaling start)", "h100-sxm", _gpt3(96, 1), "train_mfu", 0.47,
              MEGATRON, "TP 4, PP 8, DP 3, sequence 4096, batch 1152, no recomputation"),
    Published("Megatron-LM GPT-3 175B, 4608 H100 (strong scaling end)", "h100-sxm", _gpt3(4608, 6), "train_mfu", 0.42,
              MEGATRON, "TP 4, PP 8, DP 144 (8 micro-batches per replica), interleaved schedule with 6 chunks"),
)


def verl_flops(w: Workload) -> float:
    """Training FLOPs as verl's / EasyR1's FlopsCounter counts them (EasyR1 v0.3.0
    verl/utils/flops_counter.py ``_estimate_llama_flops``): 6 x (every decoder weight, input
    embedding and head included) x tokens + 12 x sum s^2 x heads x head_dim x layers (causal
    masking not halved); the vision tower is not counted, recomputation is not counted."""
    m, s = w.model, w.prompt_tokens + w.response_tokens
    return 6 * m.params * w.tokens + 12 * w.sequences * s * s * m.attention_width * m.layers


def metric_value(p: Published, eff: Efficiency) -> float:
    """The row's metric predicted with ``eff`` (already the row's framework profile)."""
    gpu = GPUS[p.gpu]
    if p.metric == "weight_sync_s":
        return phases.weight_sync_seconds(p.workload, gpu, eff)
    s = predict(p.workload, gpu, eff)
    if p.metric == "train_mfu_verl":  # EasyR1's actor MFU: timed over update_policy only
        train_s = sum(s.phases_s[k] for k in TRAIN_PARTS)
        return verl_flops(p.workload) * p.workload.train_epochs / (train_s * p.workload.gpus * gpu.bf16_tflops * 1e12)
    return float(getattr(s, p.metric))


def validation_table(base: Optional[Efficiency] = None) -> list[Row]:
    """Every published row recomputed with ``base`` (default: the defaults) and its framework's profile."""
    base = base or Efficiency()
    rows = []
    for p in PUBLISHED:
        value = metric_value(p, framework_efficiency(p.framework, base))
        error = (value - p.published) / p.published
        rows.append(Row(p.name, p.metric, value, p.published, error, abs(error) <= TOLERANCE, p.source, p.assumed,
                        p.note, p.framework))
    return rows
