"""Megatron DDP + optimizer on CPU: DP equivalence, TP training, distributed optimizer."""

import json

import pytest
import torch
from safetensors.torch import load_file

WORKER = "tests/distributed/workers/decoder_worker.py"


def _train(torchrun, tiny_qwen2, out, nproc, *extra, steps=2):
    out.mkdir()
    torchrun(WORKER, nproc, ["train", "--hf-file", str(tiny_qwen2["weights"]), "--data-file", str(tiny_qwen2["data"]),
                             "--steps", str(steps), "--micro-batch", "2", "--lr", "1e-3", "--out", str(out), *extra])
    return json.loads((out / "result.json").read_text()), load_file(str(out / "weights.safetensors"))


@pytest.fixture(scope="module")
def dp1_run(tiny_qwen2, torchrun, tmp_path_factory):
    return _train(torchrun, tiny_qwen2, tmp_path_factory.mktemp("dp1") / "run", 1)


def _assert_same_run(run, ref, what):
    (result, weights), (ref_result, ref_weights) = run, ref
    # Same global batch: DP only changes how per-rank grads are summed (gloo all-reduce
    # order), a ~1e-7 relative change; Adam's first steps move weights by ~lr=1e-3.
    assert result["losses"] == pytest.approx(ref_result["losses"], rel=1e-5), what
    assert result["grad_norms"] == pytest.approx(ref_result["grad_norms"], rel=1e-5), what
    assert set(weights) == set(ref_weights)
    for name, ref in ref_weights.items():
        torch.testing.assert_close(weights[name], ref, atol=2e-6, rtol=1e-5, msg=lambda m: f"{what} {name}: {m}")


def test_dp2_matches_dp1(dp1_run, tiny_qwen2, torchrun, tmp_path):
    _assert_same_run(_train(torchrun, tiny_qwen2, tmp_path / "dp2", 2), dp1_run, "DP=2")


def test_distributed_optimizer_dp2_matches_dp1(dp1_run, tiny_qwen2, torchrun, tmp_path):
    run = _train(torchrun, tiny_qwen2, tmp_path / "dopt", 2, "--distributed-optimizer")
    _assert_same_run(run, dp1_run, "distributed optimizer DP=2")


def test_tp2_three_steps_lower_the_loss(dp1_run, tiny_qwen2, torchrun, tmp_path):
    result, weights = _train(torchrun, tiny_qwen2, tmp_path / "tp2", 2, "--tp", "2", steps=3)
    losses = result["losses"]
    assert losses[1] < losses[0] and losses[2] < losses[1], losses
    # The first two TP=2 steps are the same math as the DP=1 run.
    assert losses[:2] == pytest.approx(dp1_run[0]["losses"], rel=1e-5)
    start = load_file(str(tiny_qwen2["weights"]))
    moved = max((weights[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-4, "no weight changed: the optimizer did not step"


@pytest.mark.parametrize("recompute", [("full", "uniform"), ("full", "block"), ("selective", "uniform")])
def test_activation_recompute_gives_the_same_training(dp1_run, tiny_qwen2, torchrun, tmp_path, recompute):
    """model.recompute_*: the backward recomputes the forward instead of keeping activations;
    the math is unchanged. Summation order can differ between the saved and the recomputed
    forward only through the RNG-free, deterministic CPU kernels, so the runs agree to fp32
    round-off (the same bound as the DP comparison)."""
    granularity, method = recompute
    run = _train(torchrun, tiny_qwen2, tmp_path / "recompute", 1, "--recompute", granularity,
                 "--recompute-method", method)
    assert run[0]["recompute"] == [granularity, method if granularity == "full" else None]
    assert dp1_run[0]["recompute"] == [None, None]
    _assert_same_run(run, dp1_run, f"recompute {granularity}/{method}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 mixed precision runs on CUDA only (CPU mode is fp32)")
def test_bf16_training_on_gpu_tracks_fp32(dp1_run, tiny_qwen2, torchrun, tmp_path):
    result, _ = _train(torchrun, tiny_qwen2, tmp_path / "bf16", 1, "--dtype", "bf16")
    # bf16 weights/activations with fp32 main params: ~3 significant digits on a loss of ~5.5.
    assert result["losses"] == pytest.approx(dp1_run[0]["losses"], rel=2e-2)
    assert result["losses"][1] < result["losses"][0]
