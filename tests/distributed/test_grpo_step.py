"""GRPO forward/backward on Megatron (packed rows, fused vocab-parallel loss, schedules)
against transformers' Qwen2 run sample by sample with the loss written in plain torch."""


import pytest
import torch

WORKER = "tests/distributed/workers/grpo_step_worker.py"
CONFIG = dict(clip_low=0.2, clip_high=0.28, kl_beta=0.05, temperature=1.0, normalization="sequence")


@pytest.fixture(scope="module")
def reference(tiny_qwen2, tmp_path_factory):
    """Samples with prompt/response splits, behaviour and reference log-probs near the
    model's own, and the Eq. 8 loss + gradients computed independently per sample."""
    model = tiny_qwen2["model"]
    vocab = tiny_qwen2["arch"].vocab_size
    gen = torch.Generator().manual_seed(5)
    samples = []
    for i in range(6):
        length = int(torch.randint(9, 21, (1,), generator=gen))
        prompt = int(torch.randint(3, 7, (1,), generator=gen))
        tokens = torch.randint(0, vocab, (length,), generator=gen)
        labels = torch.full((length,), -100)
        labels[prompt - 1:-1] = tokens[prompt:]
        samples.append({"tokens": tokens, "labels": labels, "adv": float(torch.randn(1, generator=gen))})
    model.zero_grad()
    total = torch.zeros(())
    for s in samples:
        logits = model(s["tokens"][None]).logits[0]
        targets = s["labels"] != -100
        logp = torch.log_softmax(logits.float(), -1).gather(1, s["labels"].clamp(min=0)[:, None])[:, 0]
        with torch.no_grad():
            s["old"] = torch.where(targets, logp + 0.3 * torch.randn(logp.shape, generator=gen), 0.0)
            s["ref"] = torch.where(targets, logp + 0.2 * torch.randn(logp.shape, generator=gen), 0.0)
        ratio = torch.exp(logp - s["old"])
        surrogate = torch.maximum(-s["adv"] * ratio, -s["adv"] * ratio.clamp(0.8, 1.28))
        diff = s["ref"] - logp
        per_token = surrogate + 0.05 * (diff.exp() - diff - 1)
        # Eq. 8: mean over each response, then over the 6 responses.
        total = total + (per_token * targets).sum() / targets.sum() / len(samples)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    root = tmp_path_factory.mktemp("grpo_cases")
    torch.save({"config": CONFIG, "samples": samples}, root / "cases.pt")
    return {"loss": float(total.detach()), "grads": grads, "cases": root / "cases.pt"}


@pytest.mark.parametrize("layout", [("tp", 2), ("pp", 2), ("dp", 2)], ids=["tp2", "pp2", "dp2"])
def test_grpo_step_matches_per_sample_reference(run_step_worker, assert_grads_close, reference, tmp_path, layout):
    result, grads = run_step_worker(WORKER, layout, reference["cases"], tmp_path)
    # fp32 throughout; packing, TP reductions and the fused kernel reorder sums: ~1e-6 relative.
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6)
    assert 0.0 < result["clip_fraction"] < 1.0 and result["kl"] > 0
    assert_grads_close(grads, reference["grads"])


# -- grpo.kl_placement reward and grpo.dynamic_sampling through the real trainer ------------------
def _train(tmp_path, name, inputs, *sets):
    """2 GRPO steps of the tiny R1V (2 CPU processes, TP 1) on the prompts and tokenizer in ``inputs``."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    args = ["data.train_path=" + str(inputs / "data" / "prompts.jsonl"), f"data.tokenizer={inputs / 'tok'}",
            "logging.tensorboard_dir=null", "train.steps=2", f"train.save_dir={tmp_path / name}",
            "parallel.tp=1", "rollout.n_samples=3",
            "rollout.max_new_tokens=12", *sets]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "megatron_r1v.train", "--config", str(repo / "examples/configs/tiny_grpo_cpu.yaml"),
           "--metrics-jsonl", str(tmp_path / f"{name}.jsonl")]
    for value in args:
        cmd += ["--set", value]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    cursor = json.loads((tmp_path / name / "step_000002" / "trainer.json").read_text())["data"]
    return proc, metrics, cursor


@pytest.fixture(scope="module")
def served_rm(tmp_path_factory, reward_tools):
    """8 synthetic prompts, the 640-token tokenizer and a random reward model (graded scores) on localhost."""
    import shutil

    from megatron_r1v.data.synthetic import generate_dataset
    from megatron_r1v.data.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("served_rm")
    generate_dataset(root / "data", 8, seed=1)
    build_tokenizer([root / "data" / "prompts.jsonl", root / "data" / "preferences.jsonl"], 640, root / "tok")
    shutil.copytree(root / "tok", root / "rm")
    reward_tools.save_model(root / "rm", 640)
    with reward_tools.serve(root / "rm", root / "rm.log") as info:
        yield root, info["url"]


def test_kl_in_reward_runs_through_the_trainer_pp2(tmp_path, served_rm):
    """PP=2: the log-probs (and KL sums) exist on the last stage only, the advantages are needed
    on both: the penalties reach stage 0 (else the run deadlocks or the stages' plans differ)."""
    inputs, url = served_rm
    _, metrics, _ = _train(tmp_path, "klr", inputs, f"reward.reward_model_url={url}", "reward.model_weight=1.0",
                           "parallel.pp=2", "grpo.kl_beta=0.5",
                           "grpo.kl_placement=reward", "ssb.min_reward_std=0")
    first, second = metrics
    # Step 0: the policy is the reference, bit for bit: no penalty. Step 1: the adapter moved.
    assert first["train/kl_penalty"] == 0.0 and first["train/kl"] == 0.0
    assert second["train/kl_penalty"] > 0.0 and second["train/kl"] > 0.0
    # kl_penalty = beta x (mean KL per token) x (tokens per response): the same sums.
    assert second["train/kl_penalty"] == pytest.approx(0.5 * second["train/kl"] * second["train/response_length"],
                                                       rel=1e-9)
    assert all(m["train/grpo_loss"] != 0.0 for m in metrics)
    assert "dynamic_sampling/rounds" not in first


def test_dynamic_sampling_runs_through_the_trainer_dp2(tmp_path, served_rm):
    """DP=2, each replica rolling out its own prompts, the rounds decided from counts over DP. The
    reward is rule-only here, and a random tiny policy never answers right: every group is flat, so
    every step runs grpo.dynamic_sampling_max_rounds rounds, keeps no effective group, says so, and
    trains each rank's first group (zero advantages: zero loss). The selection with effective
    groups is tests/unit/test_dynamic_sampling.py's (two gloo ranks)."""
    inputs, _ = served_rm
    proc, metrics, cursor = _train(tmp_path, "ds", inputs, "reward.model_weight=0", "grpo.dynamic_sampling=true",
                                   "grpo.dynamic_sampling_max_rounds=2", "ssb.enabled=false")
    assert [(m["dynamic_sampling/rounds"], m["dynamic_sampling/kept_fraction"]) for m in metrics] == [(2.0, 0.0)] * 2
    assert proc.stdout.count("effective groups after grpo.dynamic_sampling_max_rounds=2 rounds (8 groups drawn); "
                             "training on what was collected") == 2, proc.stdout[-3000:]
    # The loader drew 4 prompts (grpo.prompts_per_step) per round: 16 over 2 steps = 2 epochs of the 8 records.
    assert (cursor["epoch"], cursor["position"]) == (2, 0), cursor
    for m in metrics:  # one group per DP rank (the first drawn), of 3 responses
        assert m["train/grpo_loss"] == 0.0 and m["ssb/effective_ratio_fresh"] == 0.0 and m["ssb/reused_groups"] == 0.0
        assert m["train/reward_mean"] == 0.0 and "train/kl_penalty" not in m
