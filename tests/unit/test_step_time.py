"""The step-time model (megatron_r1v/step_time): each phase formula against hand-computed
values on round numbers, the published-run validation table recomputed, the calibration
hook with a hand-written gpu_check.json, and the CLI's JSON (tools/plan_step_time.py)."""

import dataclasses
import json

import pytest
from tool_modules import load_tool, run_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.models.r1v.presets import QWQ_32B
from megatron_r1v.step_time import phases
from megatron_r1v.step_time.hardware import GPUS, Efficiency, GpuSpec, calibrate
from megatron_r1v.step_time.plan import predict
from megatron_r1v.step_time.validation import PUBLISHED, TOLERANCE, validation_table
from megatron_r1v.step_time.workload import Assumptions, Layout, ModelSpec, Rollout, Workload, decoder_spec

GRPO = "examples/configs/r1v2_38b_grpo.yaml"
# Round numbers: 1000 TFLOP/s, 1000 GB/s HBM, 100 GB/s NVLink, 10 GB/s IB, 10 GB/s PCIe, 100 GB memory.
GPU = GpuSpec("T", 1000.0, 1000.0, 100.0, 100.0, 10.0, 10.0, 8)
EFF = Efficiency(train_compute=0.5, fp8_gemm_speedup=2.0, prefill_compute=0.5, decode_bw=0.5, decode_compute=0.5,
                 decode_step_overhead_ms=1.0, tp_latency_us=10.0, rollout_tail=1.0, nvlink_eff=1.0, ib_eff=1.0,
                 pcie_eff=1.0, tp_overlap=0.0, dp_overlap=0.0, fsdp_overlap=0.0, optimizer_bw=0.5,
                 sync_tensor_overhead_ms=1.0, engine_switch_s=2.0, storage_gbps=1.0, reward_rule_ms=1.0)
# 1e9 parameters (1e8 of them the embedding), 10 layers x 1000, KV width 200 in 2 heads.
M = ModelSpec("m", 1e9, 1e8, 10, 1000, 200, 2, tensors=100)


def workload(**kw) -> Workload:
    base = dict(name="w", model=M, gpus=8, layout=Layout(tp=2, pp=1), sequences=100, prompt_tokens=100.0,
                response_tokens=900.0, max_response_tokens=1900.0, micro_batch_tokens=1000.0,
                rollout=Rollout(tp=2, mem_fraction=0.5, kv_tokens=1e6), prompts=10)
    return Workload(**{**base, **kw})


def test_decoder_flops_hand_and_gpu_check():
    f = phases.decoder_forward_flops(M, 1000, 1e6)
    assert f.gemm == 2 * 9e8 * 1000 and f.attention == 2 * 10 * 1000 * 1e6
    # training = 3 x forward equals tools/gpu_check.py's FLOP count of the same decoder
    gpu_check = load_tool("gpu_check")
    spec, lengths = decoder_spec("qwq", QWQ_32B), [1000, 3000]
    w = workload(model=spec, sequences=1, prompt_tokens=0.0, response_tokens=1.0, layout=Layout())
    mine = sum(3 * (phases.decoder_forward_flops(spec, s, s * s).total) for s in lengths)
    ref = gpu_check.decoder_train_flops(int(spec.params), QWQ_32B.vocab_size, 5120, 64, lengths)
    assert mine == pytest.approx(ref, rel=1e-12)
    assert phases.train_flops(w)[0].total == pytest.approx(3 * phases.decoder_forward_flops(spec, 1, 1).total)


def test_train_flops_freeze_and_recompute():
    tokens, sum_sq = 100 * 1000, 100 * 1000 ** 2
    fwd = phases.decoder_forward_flops(M, tokens, sum_sq)
    model, hw = phases.train_flops(workload(trains=frozenset({"adapter"}), recompute="full"))
    assert model.gemm == 2 * fwd.gemm and model.attention == 3 * fwd.attention  # dgrad only, no wgrad
    assert hw.gemm == 3 * fwd.gemm and hw.attention == 4 * fwd.attention  # + the recomputed forward
    model, hw = phases.train_flops(workload(recompute="selective"))
    assert model.gemm == 3 * fwd.gemm and hw.attention == 4 * fwd.attention and hw.gemm == model.gemm


def test_compute_bubble_and_microbatches():
    w = workload(layout=Layout(tp=2, pp=2))  # dp 2: 50 sequences x 1000 tokens per replica = 50 micro-batches
    assert phases.micro_batches(w) == 50
    assert phases.bubble_fraction(w) == pytest.approx(1 / 50)
    assert phases.bubble_fraction(dataclasses.replace(w, layout=Layout(tp=2, pp=2, vpp=2))) == pytest.approx(1 / 100)
    f = phases.Flops(8e15, 2e15)
    assert phases.compute_seconds(f, 8, GPU, EFF, False) == pytest.approx(1e16 / (8 * 1e15 * 0.5))
    assert phases.compute_seconds(f, 8, GPU, EFF, True) == pytest.approx(6e15 / (8 * 1e15 * 0.5))


def test_tp_dp_optimizer():
    w = workload(trains=frozenset({"language_model"}))
    # 8 collectives x 10 layers x 25,000 tokens per TP rank pair x 1000 x 2 B x 1/2, over 100 GB/s
    assert phases.tp_comm_seconds(w, GPU, EFF) == pytest.approx(8 * 10 * 25_000 * 1000 * 2 * 0.5 / 100e9)
    # dp 4: (4 B grad + 2 B param) x 5e8 per TP rank x 3/4 over NVLink (8 GPUs = one node)
    assert phases.dp_comm_seconds(w, GPU, EFF) == pytest.approx(6 * 5e8 * 0.75 / 100e9)
    # Adam: 32 B x 5e8 / dp 4 over 1000 GB/s x 0.5
    assert phases.optimizer_seconds(w, GPU, EFF) == pytest.approx(32 * 5e8 / 4 / 500e9)
    fsdp = workload(layout=Layout(strategy="fsdp"), optimizer_steps=2)
    # 2 gathers + 1 scatter of 2 B x 1e9 x 7/8 per micro-batch; 100 seq / 8 GPUs / 2 steps -> 7 micro-batches
    assert phases.micro_batches(fsdp) == 7
    assert phases.dp_comm_seconds(fsdp, GPU, EFF) == pytest.approx(14 * 3 * 2e9 * 7 / 8 / 100e9)


def test_decode_prefill_reward():
    w = workload()
    kv = phases.kv_bytes_per_token(M, 2)  # 2 x 10 layers x 1 head x 100 dim x 2 B
    assert kv == 4000
    # 25 sequences per engine, all at once; context 100 + 450
    t = phases.decode_iteration_seconds(w, GPU, EFF, 25)
    memory = (2 * 1e9 / 2 + 25 * 4000 * 550) / 500e9
    compute = 2 * 9e8 * 25 / 2 / 500e12
    assert t == pytest.approx(max(memory, compute) + 1e-3 + 2 * 10 * 10e-6)
    d = phases.decode_shape(w, GPU, EFF)
    assert (d.engines, d.sequences_per_engine, d.concurrency, d.tail_tokens) == (4, 25, 25, 1900)
    r = phases.rollout_seconds(w, GPU, EFF)
    t1 = phases.decode_iteration_seconds(w, GPU, EFF, 1)
    assert r["rollout_decode"] == pytest.approx(25 * 900 / 25 * t + 1000 * t1)
    prefill = 10 * (2 * 9e8 * 100 + 2 * 10 * 1000 * 100 ** 2) / 4 / (2 * 1000e12 * 0.5)
    assert r["rollout_prefill"] == pytest.approx(prefill)
    assert phases.reward_seconds(w, GPU, EFF) == pytest.approx(0.1)  # 100 responses x 1 ms
    rm = workload(reward_model_params=1e9, reward_gpus=2)
    assert phases.reward_seconds(rm, GPU, EFF) == pytest.approx(0.1 + 2e9 * 100_000 / (2 * 1e15 * 0.5))
    pool = workload(rollout=Rollout(tp=2, mem_fraction=0.5))  # (50 GB - 2 GB / 2) / 4000 B per token
    assert phases.decode_shape(pool, GPU, EFF).kv_tokens == pytest.approx(49e9 / 4000)


def test_sync_switch_checkpoint_offload_logprob():
    w = workload(sync_path="nvlink", sync_gather=True, checkpoint_bytes=1e10, checkpoint_interval=10,
                 offload_bytes_per_gpu=1e9, logprob_passes=2)
    # 1e9 trainable x 2 B / engine tp 2 over NVLink + gather 2e9 B over NVLink + 100 tensors x 1 ms
    assert phases.weight_sync_seconds(w, GPU, EFF) == pytest.approx(1e9 / 100e9 + 2e9 / 100e9 + 0.1)
    assert phases.engine_switch_seconds(w, EFF) == 2.0
    assert phases.engine_switch_seconds(dataclasses.replace(w, rollout=Rollout(2, 0.5, gpus=8)), EFF) == 0.0
    assert phases.checkpoint_seconds(w, EFF) == pytest.approx(1e10 / 1e9 / 10)
    assert phases.offload_seconds(w, GPU, EFF) == pytest.approx(2 * 1e9 / 10e9)
    fwd = phases.decoder_forward_flops(M, 100_000, 100 * 1000 ** 2)
    assert phases.logprob_seconds(w, GPU, EFF) == pytest.approx(2 * fwd.total / (8 * 1e15 * 0.5))


def test_predict_colocated_and_async():
    w = workload()
    s = predict(w, GPU, EFF)
    assert s.step_s == pytest.approx(sum(s.phases_s.values()))
    assert sum(s.shares.values()) == pytest.approx(1.0)
    assert s.tokens_per_s_per_gpu == pytest.approx(100_000 / s.step_s / 8)
    a = predict(dataclasses.replace(w, rollout=Rollout(tp=2, mem_fraction=0.5, kv_tokens=1e6, gpus=8),
                                    checkpoint_bytes=1e10, checkpoint_interval=10), GPU, EFF)
    p = a.phases_s
    rollout = p["rollout_prefill"] + p["rollout_decode"]
    train = p["logprob"] + sum(p[k] for k in ("train_compute", "train_bubble", "train_tp_comm", "train_dp_comm",
                                              "optimizer", "offload"))
    # one step off: generation of k+1 overlaps training of k; scoring, the sync into the idle
    # engine and a checkpoint (which waits for the generation) are serial; no engine switch
    assert p["engine_switch"] == 0.0 and p["checkpoint"] == pytest.approx(1.0)
    assert a.gpus == 16 and a.step_s == pytest.approx(max(rollout, train) + p["reward"] + p["weight_sync"] + 1.0)


def test_one_step_off_hand_computed():
    from megatron_r1v.step_time.sensitivity import one_step_off

    # 16 GPUs, 8 of them roll out: 4 engines of tp 2 (25 sequences each), training on 8 (dp 4)
    w = one_step_off(workload(gpus=16, rollout=Rollout(tp=2, mem_fraction=0.5, kv_tokens=1e6),
                              trains=frozenset({"adapter"}), sync_bytes=1e9), 8, mem_fraction=0.9)
    assert (w.gpus, w.rollout.gpus, w.rollout.mem_fraction, w.rollout.kv_tokens, w.sync_path) == (8, 8, 0.9, None,
                                                                                                   "host")
    # through the host: 1 GB down and up over PCIe 10 GB/s (eff 1) + 8 tensors (adapter only) x 1 ms
    assert phases.weight_sync_seconds(w, GPU, EFF) == pytest.approx(2 * 1e9 / 10e9 + 8e-3)
    d = phases.decode_shape(w, GPU, EFF)
    assert (d.engines, d.sequences_per_engine) == (4, 25)
    # the pool: 0.9 x 100 GB - 1 GB of weights per GPU, 4000 B per token
    assert d.kv_tokens == pytest.approx(89e9 / 4000)
    s = predict(w, GPU, EFF)
    p = s.phases_s
    t1 = phases.decode_iteration_seconds(w, GPU, EFF, 1)
    decode = 25 * 900 / 25 * phases.decode_iteration_seconds(w, GPU, EFF, 25) + 1000 * t1
    assert p["rollout_decode"] == pytest.approx(decode)
    rollout, serial = p["rollout_prefill"] + decode, p["reward"] + p["weight_sync"]
    train = sum(v for k, v in p.items() if k not in ("rollout_prefill", "rollout_decode", "reward", "weight_sync"))
    assert s.step_s == pytest.approx(max(rollout, train) + serial) and s.gpus == 16
    with pytest.raises(ValueError, match="one step off"):
        one_step_off(workload(), 8)


def test_framework_profile_fitted_once_and_used():
    from megatron_r1v.step_time.hardware import FRAMEWORKS, framework_efficiency
    from megatron_r1v.step_time.validation import metric_value

    fsdp = framework_efficiency("fsdp-hf")
    assert FRAMEWORKS["megatron-te"].factors == {} and framework_efficiency("megatron-te") == Efficiency()
    changed = {k for k, v in vars(fsdp).items() if v != getattr(Efficiency(), k)}
    assert changed == {"train_compute"} and fsdp.train_compute == 0.22  # the one fitted factor
    with pytest.raises(ValueError, match="--framework"):
        framework_efficiency("deepspeed")
    # hand: compute time scales with 1 / train_compute
    f = phases.Flops(8e15, 2e15)
    assert phases.compute_seconds(f, 8, GPU, dataclasses.replace(EFF, train_compute=0.22), False) == pytest.approx(
        1e16 / (8 * 1e15 * 0.22))
    # the row that fitted it reproduces its published value; the table applies the profile:
    # with the defaults instead, every EasyR1 row would move (the test fails if the profile is ignored)
    rows = validation_table()
    fit = [i for i, p in enumerate(PUBLISHED) if p.framework == "fsdp-hf" and p.metric == "train_mfu_verl"][0]
    assert abs(rows[fit].error) < 0.005 and PUBLISHED[fit].published == 0.136
    for p, r in zip(PUBLISHED, rows):
        assert r.framework == p.framework
        assert r.predicted == pytest.approx(metric_value(p, framework_efficiency(p.framework)))
        if p.framework == "fsdp-hf" and p.metric != "weight_sync_s":
            assert abs(metric_value(p, Efficiency()) - r.predicted) > 0.2 * r.predicted


def test_verl_flops_and_vllm_cap():
    from megatron_r1v.step_time.validation import VLLM_MAX_NUM_SEQS, verl_flops

    w = workload()  # 100 sequences of 1000 tokens
    assert verl_flops(w) == pytest.approx(6 * 1e9 * 100_000 + 12 * 100 * 1000 ** 2 * 1000 * 10)
    capped = workload(rollout=Rollout(tp=2, mem_fraction=0.5, kv_tokens=1e6, max_running=10))
    d = phases.decode_shape(capped, GPU, EFF)
    assert d.concurrency == 10  # 25 sequences per engine, 10 at once
    t = phases.decode_iteration_seconds(capped, GPU, EFF, 10)
    t1 = phases.decode_iteration_seconds(capped, GPU, EFF, 1)
    assert phases.rollout_seconds(capped, GPU, EFF)["rollout_decode"] == pytest.approx(25 * 900 / 10 * t + 1000 * t1)
    easy = [p for p in PUBLISHED if p.name.startswith("EasyR1")]
    assert easy and all(p.workload.rollout.max_running == VLLM_MAX_NUM_SEQS == 256 for p in easy)


# The validation table of docs/step_time.md: error rounded to 1 % per row, each with its framework profile.
EXPECTED_ERRORS = [-24, 32, 0, -16, -24, -13, 15, 19, -31, 39, -19, 10, -32, 42, -21, 14, -10, 165, 3, -11]


def test_validation_table_recomputes():
    rows = validation_table()
    assert len(rows) == len(PUBLISHED) == len(EXPECTED_ERRORS)
    assert [round(100 * r.error) for r in rows] == EXPECTED_ERRORS
    assert [r.within for r in rows] == [abs(e) <= 100 * TOLERANCE for e in EXPECTED_ERRORS]
    assert all(r.source.startswith("https://") and r.assumed for r in rows)


def test_calibration_file(tmp_path):
    report = {"device": "NVIDIA H100 80GB HBM3", "parts": {
        "kernels": {"copy_gbps": 2680.0},
        "train": {"runs": [{"backend": "te", "fp8": False, "mfu_frac": 0.42},
                           {"backend": "te", "fp8": True, "mfu_frac": 0.546},
                           {"backend": "local", "fp8": False, "mfu_frac": 0.30}]}}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    eff, factors = calibrate(path, GPUS["h100-sxm"], Efficiency())
    assert eff.train_compute == 0.42 and eff.fp8_gemm_speedup == pytest.approx(1.3)
    assert eff.decode_bw == pytest.approx(2680 / 3350 * 0.8)
    assert set(factors) == {"train_compute", "fp8_gemm_speedup", "decode_bw"}
    with pytest.raises(ValueError, match="measured on 'NVIDIA H100"):
        calibrate(path, GPUS["a100-sxm"], Efficiency())
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"efficiency": {"decode_bw": 0.7}}))
    assert calibrate(flat, GPUS["h200"], Efficiency())[0].decode_bw == 0.7
    flat.write_text(json.dumps({"efficiency": {"decode_bandwidth": 0.7}}))
    with pytest.raises(ValueError, match="efficiency.decode_bandwidth: no such factor"):
        calibrate(flat, GPUS["h200"], Efficiency())
    with pytest.raises(ValueError, match="assume.foo"):
        Assumptions().with_overrides({"foo": 1})


def test_cli_json_overrides_and_errors(tmp_path):
    out = run_tool("plan_step_time", "--config", GRPO, "--gpus", "64", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert {"phases_s", "step_s", "shares", "tokens_per_s_per_gpu", "train_mfu", "step_mfu", "assumptions",
            "efficiency", "concurrency"} <= set(plan)
    assert set(plan["phases_s"]) == {"rollout_prefill", "rollout_decode", "reward", "logprob", "train_compute",
                                     "train_bubble", "train_tp_comm", "train_dp_comm", "optimizer", "offload",
                                     "weight_sync", "engine_switch", "checkpoint"}
    assert plan["step_s"] == pytest.approx(sum(plan["phases_s"].values()))
    calib = tmp_path / "c.json"
    calib.write_text(json.dumps({"efficiency": {"decode_bw": 0.3}}))
    slow = json.loads(run_tool("plan_step_time", "--config", GRPO, "--gpus", "64", "--json", "--calibration",
                               str(calib), "--set", "assume.mean_response_frac=0.5").stdout)
    assert slow["phases_s"]["rollout_decode"] > plan["phases_s"]["rollout_decode"]
    assert slow["efficiency"]["decode_bw"] == 0.3
    bad = run_tool("plan_step_time", "--config", GRPO, "--gpus", "60")
    assert bad.returncode == 2 and "not divisible" in bad.stderr
    bad = run_tool("plan_step_time", "--config", GRPO, "--gpus", "64", "--set", "efficiency.nope=1")
    assert bad.returncode == 2 and "efficiency.nope" in bad.stderr
    val = run_tool("plan_step_time", "--validate", "--json")
    assert val.returncode == 0 and len(json.loads(val.stdout)) == len(PUBLISHED)


def test_sensitivity_table_and_png(tmp_path):
    from megatron_r1v.config import load_config
    from megatron_r1v.step_time.sensitivity import Variant, plot_sensitivity, sensitivity

    cfg = load_config(GRPO)
    rows = sensitivity(cfg, 64, variants=[Variant("baseline", "recipe", {}, {}),
                                          Variant("samples per prompt", "16", {"rollout.n_samples": 16}, {}),
                                          Variant("layout", "async", {}, {}, split_rollout=True),
                                          Variant("parallel", "tp 3", {"parallel.tp": 3}, {})])
    base, more, split, bad = rows
    assert more.step_s > base.step_s and more.groups_s["rollout"] > base.groups_s["rollout"]
    assert split.step_s < sum(split.groups_s.values())  # rollout overlaps training
    assert bad.step_s is None and bad.note.startswith("skipped:")
    png = plot_sensitivity({"grpo": rows}, tmp_path / "s.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
