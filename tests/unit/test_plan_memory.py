"""The memory planner: exact parameter-state bytes against built models, the 38B recipes,
activation-model properties, advice, and the CLI (tools/plan_memory.py).

Byte counts of weights, gradients and optimizer state are integers and must match the
built model exactly; activation and SGLang numbers are a model (megatron_r1v/memory_plan.py
docstring), so they are checked against hand-derived values and structural properties.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tool_modules import run_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.config import FP8Config, load_config
from megatron_r1v.memory_plan import (
    FREEZE_PARTS,
    GB,
    _Act,
    decoder_layer_bytes,
    param_bytes,
    plan_memory,
    stage_tensors,
    with_overrides,
)
from megatron_r1v.models.r1v.presets import get_preset

REPO = Path(__file__).resolve().parents[2]
WORKER = "tests/distributed/workers/plan_memory_worker.py"
MPO, GRPO = "examples/configs/r1v2_38b_mpo.yaml", "examples/configs/r1v2_38b_grpo.yaml"
# What each 38B recipe needs on top of its YAML to fit (see the planner's advice):
# Both recipes fit as written (MPO's sets full recomputation for its 32768-token micro-batches).
RECIPE_FIXES: dict[str, list[str]] = {MPO: [], GRPO: []}
# Layouts pinned for tests of the model's structure (the recipes may change around them).
PINNED_MPO = ["parallel.tp=8", "parallel.pp=2", "parallel.sequence_parallel=true", "mpo.micro_batch_tokens=32768",
              "model.fp8.format=null", "model.freeze=all", "model.recompute_granularity=null"]
PINNED_GRPO = ["parallel.tp=8", "parallel.pp=1", "model.freeze=adapter", "optimizer.use_distributed_optimizer=true"]
ADAPTER_LOCAL = 5120 // 8 * 12800 + 5120 // 8 + 5120 * 5120 // 8 + 2 * 12800 + 5120  # adapter params per TP-8 rank
TINY_CASES = [
    *({"preset": "tiny-r1v", "freeze": f, "distributed_optimizer": False} for f in FREEZE_PARTS),
    {"preset": "tiny-r1v", "freeze": "adapter+vision", "distributed_optimizer": True},
    {"preset": "tiny-qwen2", "freeze": "adapter+llm", "distributed_optimizer": False},
    {"preset": "r1v2-38b", "freeze": "all", "distributed_optimizer": False, "meta": True},
]


def tiny_config(case: dict, tp: int = 1, pp: int = 1, dtype: str = "fp32"):
    return load_config(None, [f"model.preset={case['preset']}", f"model.freeze={case['freeze']}",
                              f"model.params_dtype={dtype}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                              f"optimizer.use_distributed_optimizer={str(case['distributed_optimizer']).lower()}"])


def check_rank(case: dict, measured: dict, rank: dict, tp: int, pp: int) -> None:
    """The planner's numbers for this (pp_rank, tp_rank) equal the measured ones, byte for byte."""
    cfg = tiny_config(case, tp, pp)
    planned = {t.name: t.numel for t in stage_tensors(case["preset"], tp, pp, rank["pp_rank"])}
    assert planned == measured["numels"], case
    pb = param_bytes(cfg, rank["pp_rank"], rank["tp_rank"], rank["dp"])
    assert pb.numel == sum(planned.values())
    assert pb.weights == measured["weights"] == 4 * pb.numel
    assert pb.trainable_numel == measured["trainable"]
    if case.get("meta"):
        return
    # Only trainable parameters get a main_grad, all fp32 (grad_reduce_in_fp32).
    assert measured["frozen_with_main_grad"] == []
    assert measured["main_grad_dtypes"] in ([], ["torch.float32"])
    assert pb.grads == measured["main_grad_bytes"] == 4 * measured["trainable"]
    # fp32 params are their own main params: Adam's exp_avg + exp_avg_sq only.
    assert measured["master_bytes"] == 0
    if not case["distributed_optimizer"] or rank["dp"] == 1:
        assert pb.optimizer == measured["optimizer_state_bytes"] == 8 * measured["trainable"]
    # bf16 params (not buildable on CPU): same tensors, 2-byte weights, fp32 master + Adam.
    bf16 = param_bytes(tiny_config(case, tp, pp, "bf16"), rank["pp_rank"], rank["tp_rank"], rank["dp"])
    assert bf16.weights == 2 * pb.numel and bf16.grads == pb.grads
    assert bf16.optimizer * (rank["dp"] if case["distributed_optimizer"] else 1) == 12 * pb.trainable_numel


@pytest.fixture(scope="module")
def tp1_build(torchrun, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan_memory_tp1")
    (out / "cases.json").write_text(json.dumps(TINY_CASES))
    torchrun(WORKER, 1, ["--cases", str(out / "cases.json"), "--out", str(out)])
    return json.loads((out / "rank0.json").read_text())


def test_freeze_parts_are_the_models_policies():
    from megatron_r1v.models.r1v.model import FREEZE_POLICIES

    assert FREEZE_PARTS == FREEZE_POLICIES


def _case_id(i: int) -> str:
    case = TINY_CASES[i]
    return f"{case['preset']}-{case['freeze']}-{'distopt' if case['distributed_optimizer'] else 'adam'}"


@pytest.mark.parametrize("index", range(len(TINY_CASES)), ids=_case_id)
def test_parameter_state_bytes_equal_the_built_model(tp1_build, index):
    check_rank(TINY_CASES[index], tp1_build["cases"][index], tp1_build, 1, 1)


def test_stage_tensors_pad_vocab_and_vision_heads():
    arch = get_preset("r1v2-38b")
    first = {t.name: t.numel for t in stage_tensors("r1v2-38b", 8, 2, 0)}
    last = {t.name: t.numel for t in stage_tensors("r1v2-38b", 8, 2, 1)}
    assert first["language_model.embedding.word_embeddings.weight"] == 152576 // 8 * 5120
    assert last["language_model.output_layer.weight"] == 152576 // 8 * 5120
    assert "language_model.output_layer.weight" not in first and "vision.class_token" not in last
    # 25 heads -> 32 at TP 8: 4 local heads of 128.
    assert first["vision.encoder.layers.0.self_attention.linear_qkv.weight"] == 3 * 4 * 128 * 3200
    assert first["vision.encoder.layers.0.self_attention.q_layernorm.weight"] == 4 * 128
    assert sum(1 for n in last if ".decoder.layers." in n and n.endswith("input_layernorm.weight")) == 32
    # TP shards sum to the padded model; the closed-form counts of the preset are unpadded.
    total = sum(t.numel for t in stage_tensors("r1v2-38b", 1, 1, 0))
    pad = 2 * (152576 - 152064) * 5120
    assert total - pad == arch.parameter_counts()["total"]


@pytest.mark.parametrize("recipe", [MPO, GRPO])
def test_38b_recipes_fit_on_64_gpus(recipe):
    plan = plan_memory(load_config(REPO / recipe, RECIPE_FIXES[recipe]), 64, 80.0)
    print(f"\n{recipe}: training {plan.training_phase_gb:.1f} GB, rollout {plan.rollout_phase_gb:.1f} GB, "
          f"peak {plan.peak_gb:.1f} GB (weights {plan.weights_gb:.1f}, grads {plan.grads_gb:.1f}, "
          f"optimizer {plan.optimizer_gb:.1f}, activations {plan.activations_gb:.1f})")
    assert plan.fits, (plan.problems, plan.advice)
    assert plan.peak_gb == max(plan.training_phase_gb, plan.rollout_phase_gb) <= 80
    assert plan.dp == 64 // (plan.tp * plan.pp)
    if recipe == GRPO:
        cfg, r = load_config(REPO / recipe), plan.rollout
        assert r.engine == "sglang" and r.kv_bytes_per_token == 2 * 64 * max(8 // plan.tp, 1) * 128 * 2
        assert r.weights_gb == pytest.approx(38392158592 * 2 / plan.tp / GB)
        # SGLang starts after the trainer's bf16 weights, fp32 grads and fp32 master shards (+ 1 GB context).
        stage0 = plan.stages[0]
        master = stage0.grads_gb * (1 / plan.dp if cfg.optimizer.use_distributed_optimizer else 1)
        free = 80 - stage0.weights_gb - stage0.grads_gb - master - 1.0
        assert r.free_at_start_gb == pytest.approx(free)
        assert r.static_gb == pytest.approx(cfg.rollout.mem_fraction_static * free)
        assert r.kv_tokens == int((r.static_gb - r.weights_gb) * GB // r.kv_bytes_per_token)
        assert r.sequences_per_engine == -(-cfg.grpo.prompts_per_step * cfg.rollout.n_samples // plan.dp)
        assert r.concurrency == min(r.sequences_per_engine, r.kv_tokens // cfg.train.seq_length)
        assert r.waves * r.concurrency >= r.sequences_per_engine


def test_grpo_adapter_only_state_is_the_adapter_shard():
    plan = plan_memory(load_config(REPO / GRPO, PINNED_GRPO), 64, 80.0)
    # Adapter-only: fp32 gradients of the adapter's TP shard only: fc1 [5120/8, 12800] + bias,
    # fc2 [5120, 5120/8]; its LayerNorm (2 x 12800) and fc2 bias are replicated.
    assert plan.grads_gb * GB == 4 * ADAPTER_LOCAL
    assert plan.optimizer_gb * GB == 12 * ADAPTER_LOCAL / plan.dp  # fp32 master + Adam, sharded over DP 8


def test_mpo_recipe_without_recomputation_gets_advice_naming_keys():
    plan = plan_memory(load_config(REPO / MPO, PINNED_MPO), 64, 80.0)
    assert not plan.fits and plan.problems
    assert any("model.recompute_granularity=full" in a and a.endswith("fits") for a in plan.advice), plan.advice


def test_38b_full_training_on_8_gpus_cannot_fit():
    cfg = load_config(REPO / MPO, PINNED_MPO + ["parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false",
                                                "optimizer.use_distributed_optimizer=false"])
    plan = plan_memory(cfg, 8, 80.0)
    assert not plan.fits and plan.peak_gb > 500
    # Full training alone: 38.4B x (2 + 4 + 12) bytes, minus the distributed optimizer's savings when advised.
    assert plan.weights_gb + plan.grads_gb + plan.optimizer_gb == pytest.approx(38397401472 * 18 / GB)
    text = " ".join(plan.advice)
    for key in ("model.recompute_granularity", "optimizer.use_distributed_optimizer", "parallel.tp",
                "mpo.micro_batch_tokens"):
        assert key in text, plan.advice
    assert plan.advice[-1].startswith("together:") and "still too large" in plan.advice[-1]


def test_decoder_activations_follow_the_derivation():
    arch = get_preset("r1v2-38b")
    # QwQ per token per layer, bf16, TP 8 + SP, frozen: 2 norm inputs 2*2*5120/8 + Q,K,V 2*(5120+2*1024)/8
    # + O 2*5120/8 + SwiGLU input 2*2*27648/8 = 2560 + 1792 + 1280 + 13824.
    sp8 = _Act(2, 8, True, False, False)
    assert decoder_layer_bytes(arch, sp8, 1, False) == 19456
    # Trainable adds the QKV/fc1 inputs (2*2*5120/8) and the fc2 input (2*27648/8): Korthikanti's "34" analogue.
    assert decoder_layer_bytes(arch, sp8, 1, True) == 19456 + 2560 + 6912
    # With SP every term is divided by TP; without it the norm/GEMM inputs are replicated.
    assert decoder_layer_bytes(arch, _Act(2, 1, False, False, False), 1, True) == 8 * (19456 + 2560 + 6912)
    no_sp = decoder_layer_bytes(arch, _Act(2, 8, False, False, False), 1, True)
    # (Korthikanti's 10 + 24/t: here 4 replicated tensors, 2 norm inputs and 2 GEMM inputs, no dropout masks.)
    assert no_sp == (19456 + 2560 + 6912) + 4 * 2 * 5120 * (1 - 1 / 8)
    # FP8 stores the three GEMM inputs in one byte and adds a 1-byte copy of O.
    fp8 = decoder_layer_bytes(arch, _Act(2, 8, True, True, False), 1, True)
    assert fp8 == 19456 + 2560 / 2 + 6912 / 2 + 5120 / 8
    # Varlen attention on every backend: no a*s^2 term; the local backend's SegmentAttention keeps one
    # more copy of O (its per-sample outputs are concatenated), linear in the tokens.
    s = 4096
    local = decoder_layer_bytes(arch, _Act(2, 8, True, False, True), s, False)
    assert local - decoder_layer_bytes(arch, sp8, s, False) == 2 * 5120 / 8 * s


def test_recomputation_pipeline_and_selective_under_flash():
    cfg = load_config(REPO / MPO, PINNED_MPO)
    base = plan_memory(cfg, 64, 80.0).stages
    sel = plan_memory(with_overrides(cfg, {"model.recompute_granularity": "selective"}), 64, 80.0).stages
    assert sel[0].activations_gb == base[0].activations_gb  # flash attention saves no a*s^2 to drop
    local = with_overrides(cfg, {"model.backend": "local", "parallel.sequence_parallel": False})
    local_base = plan_memory(local, 64, 80.0).stages[1].activation_parts_gb["decoder"]
    local_sel = plan_memory(with_overrides(local, {"model.recompute_granularity": "selective"}), 64, 80.0).stages
    # The local backend's SegmentAttention is varlen flash attention too: no a*s^2 output to drop.
    assert local_sel[1].activation_parts_gb["decoder"] == local_base
    full = plan_memory(with_overrides(cfg, {"model.recompute_granularity": "full"}), 64, 80.0).stages
    tokens, h = 32768, 5120
    # Full, uniform, 1 layer per group: each of the 32 layers of a stage keeps its input, sharded by SP.
    assert full[1].activation_parts_gb["decoder"] * GB == 32 * 2 * tokens * h / 8
    assert full[0].in_flight == 2 and full[1].in_flight == 1  # 1F1B
    assert full[0].activation_parts_gb["decoder"] == 2 * full[1].activation_parts_gb["decoder"]
    groups = plan_memory(with_overrides(cfg, {"model.recompute_granularity": "full",
                                              "model.recompute_num_layers": 4}), 64, 80.0).stages
    assert groups[1].activation_parts_gb["decoder"] * 4 == full[1].activation_parts_gb["decoder"]
    block = plan_memory(with_overrides(cfg, {"model.recompute_granularity": "full", "model.recompute_method": "block",
                                             "model.recompute_num_layers": 8}), 64, 80.0).stages
    per_layer = base[1].activation_parts_gb["decoder"] / 32
    assert block[1].activation_parts_gb["decoder"] == pytest.approx(24 * per_layer + 8 * 2 * tokens * h / 8 / GB)


def test_oversized_sglang_pool_gets_a_smaller_fraction():
    cfg = load_config(REPO / GRPO, PINNED_GRPO + ["rollout.mem_fraction_static=0.95"])
    plan = plan_memory(cfg, 64, 80.0)
    assert not plan.fits and plan.rollout_phase_gb > plan.training_phase_gb
    (advice,) = [a for a in plan.advice if "rollout.mem_fraction_static=" in a]
    fraction = float(advice.split("rollout.mem_fraction_static=")[1].split()[0])
    assert fraction < 0.95 and advice.endswith("fits")
    assert plan_memory(with_overrides(cfg, {"rollout.mem_fraction_static": fraction}), 64, 80.0).fits


def test_kl_reference_copy_and_hf_engine():
    plan = plan_memory(load_config(REPO / GRPO, PINNED_GRPO + ["grpo.kl_beta=0.01"]), 64, 80.0)
    ref = ADAPTER_LOCAL * 2 / GB  # the bf16 adapter shard
    assert plan.stages[0].reference_gb == pytest.approx(ref)
    no_kl = plan_memory(load_config(REPO / GRPO, PINNED_GRPO + ["grpo.kl_beta=0"]), 64, 80.0)
    assert plan.training_phase_gb - no_kl.training_phase_gb == pytest.approx(2 * ref)
    assert plan.rollout_phase_gb - no_kl.rollout_phase_gb == pytest.approx(ref)
    hf = plan_memory(load_config(REPO / GRPO, PINNED_GRPO + ["rollout.engine=hf"]), 64, 80.0)
    assert not hf.fits and any("rollout.engine=sglang" in a for a in hf.advice), hf.advice


def test_fp8_weight_cache_and_image_tiles():
    cfg = load_config(REPO / GRPO, PINNED_GRPO + ["model.backend=te"])
    bf16 = plan_memory(with_overrides(cfg, {"model.fp8": FP8Config(format=None)}), 64, 80.0)
    fp8 = plan_memory(with_overrides(cfg, {"model.fp8": FP8Config(format="hybrid")}), 64, 80.0)
    gemm = sum(t.numel for t in stage_tensors("r1v2-38b", 8, 1, 0) if t.gemm)
    assert fp8.stages[0].fp8_cache_gb * GB == 2 * gemm and bf16.stages[0].fp8_cache_gb == 0
    # The cache persists through the rollout; saved GEMM inputs shrink in training.
    assert fp8.rollout_phase_gb - bf16.rollout_phase_gb == pytest.approx(2 * gemm / GB)
    assert fp8.stages[0].activation_parts_gb["decoder"] <= bf16.stages[0].activation_parts_gb["decoder"]
    # Tiles: one image of max_tiles + 1 per seq_length tokens by default, capped by the micro-batch.
    mpo = load_config(REPO / MPO, PINNED_MPO)
    assert plan_memory(mpo, 64, 80.0).tiles_per_microbatch == 2 * (mpo.data.max_tiles + 1)
    assert plan_memory(mpo, 64, 80.0, tiles_per_microbatch=10_000).tiles_per_microbatch == 32768 // 256
    more = plan_memory(mpo, 64, 80.0, tiles_per_microbatch=64)
    assert more.stages[0].activation_parts_gb["vision"] > plan_memory(mpo, 64, 80.0).stages[0].activation_parts_gb[
        "vision"] and more.stages[1].activation_parts_gb == plan_memory(mpo, 64, 80.0).stages[1].activation_parts_gb


def test_tiny_cpu_config_fits():
    plan = plan_memory(load_config(REPO / "examples/configs/tiny_grpo_cpu.yaml"), 2, 16.0)
    assert plan.fits and plan.stages[0].weights_gb * GB == param_bytes(load_config(
        REPO / "examples/configs/tiny_grpo_cpu.yaml"), 0).weights


def _cli(*args, process=False):
    """tools/plan_memory.py ARGS: in this process (tool_modules.run_tool: main's return value is the
    exit status), or with ``process`` as a real ``python tools/plan_memory.py`` (its exit status)."""
    if not process:
        return run_tool("plan_memory", *args, cwd=REPO)
    return subprocess.run([sys.executable, str(REPO / "tools" / "plan_memory.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_cli_exit_codes_table_and_json():
    ok = _cli("--config", GRPO, "--gpus", "64")
    assert ok.returncode == 0, ok.stderr
    assert "fits" in ok.stdout and "rollout engine sglang" in ok.stdout and "peak" in ok.stdout
    js = _cli("--config", GRPO, "--gpus", "64", "--json")
    plan = json.loads(js.stdout)
    assert js.returncode == 0 and plan["fits"] is True and plan["rollout"]["concurrency"] > 0
    assert plan["peak_gb"] == max(plan["training_phase_gb"], plan["rollout_phase_gb"])
    assert {"weights_gb", "grads_gb", "optimizer_gb", "activations_gb", "advice", "stages"} <= set(plan)
    # One real process: the script's exit status is main's (1: does not fit).
    bad = _cli("--config", MPO, "--gpus", "8", "--set", "parallel.tp=1", "--set", "parallel.pp=1",
               "--set", "parallel.sequence_parallel=false", "--json", process=True)
    assert bad.returncode == 1 and json.loads(bad.stdout)["fits"] is False
    assert json.loads(bad.stdout)["advice"]
    table = _cli("--config", MPO, "--gpus", "64", *(a for kv in PINNED_MPO for a in ("--set", kv)))
    assert table.returncode == 1 and "DOES NOT FIT" in table.stdout and "advice: set model.recompute" in table.stdout
    uneven = _cli("--config", MPO, "--gpus", "60")
    assert uneven.returncode == 2 and "parallel.tp*pp*cp" in uneven.stderr
    typo = _cli("--config", MPO, "--gpus", "64", "--set", "train.stpes=3")
    assert typo.returncode == 2 and "train.stpes" in typo.stderr
    missing = _cli("--config", "nope.yaml", "--gpus", "64")
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
