"""End to end: 4 GRPO steps of the tiny R1V with TP=2 on CPU write every TensorBoard tag.

A random tiny policy never answers right, so rule and format rewards are all 0 and every
group would have zero advantage; a tiny random image-aware reward model in Skywork-VL
Reward's format (``tools/make_tiny_checkpoint.py --reward-model skywork-vl``: a Qwen2.5-VL
plus a value head) served over HTTP (tools/serve_reward_model.py, sent each prompt's images)
gives graded scores, so groups carry advantages, the Selective Sample Buffer fills and the
adapter actually trains. The SSB's effective-group criterion (``ssb.min_reward_std: auto``,
0.05 for these sigmoid-calibrated scores) drops the nearly flat groups, so the
effective-ratio metrics move.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.tokenizer import build_tokenizer
from megatron_r1v.trainer.metrics import stage_tags

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@contextlib.contextmanager
def served_reward(tmp_path, reward_tools, num_prompts: int, seed: int):
    """Synthetic prompts, a 640-token tokenizer and a random image-aware reward model
    (Skywork-VL format, written by the real CLI) served on localhost; yields the --set
    arguments that point the run at it (sigmoid-calibrated scores)."""
    generate_dataset(tmp_path / "data", num_prompts, seed=seed)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl", tmp_path / "data" / "preferences.jsonl"], 640,
                    tmp_path / "tok")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_checkpoint.py"), "--reward-model", "skywork-vl",
                    "--out", str(tmp_path / "rm"), "--seed", str(seed)], check=True, capture_output=True, env=ENV)
    with reward_tools.serve(tmp_path / "rm", tmp_path / "rm.log") as info:
        assert info.get("kind") == "skywork-vl", info
        # ssb.min_reward_std: inside the spread of this random model's scores (test_four_grpo_steps...).
        yield ["--set", f"reward.reward_model_url={info['url']}", "--set", "reward.model_weight=1.0",
               "--set", "reward.model_calibration=sigmoid", "--set", "ssb.min_reward_std=0.01"]


@pytest.fixture(scope="module")
def served_12(tmp_path_factory, reward_tools):
    """``served_reward`` with 12 prompts (seed 0), built and served once for the two tests that
    use that setup; yields (the folder holding data/, tok/ and rm/, the --set arguments)."""
    root = tmp_path_factory.mktemp("served_12")
    with served_reward(root, reward_tools, 12, seed=0) as reward_args:
        yield root, reward_args


@pytest.fixture(scope="module")
def grpo_full(tmp_path_factory, served_12):
    """6 GRPO steps at TP=2 in one run, checkpoints every 3 steps (the uninterrupted run the
    resume tests compare with); returns its folder (``full/``, ``full.jsonl``)."""
    root = tmp_path_factory.mktemp("grpo_full")
    inputs, reward_args = served_12
    _run(root, "full", 6, *reward_args, "--set", "train.save_interval=3", inputs=inputs)
    return root


def _run(tmp_path, name, steps, *extra, inputs=None):
    """``steps`` GRPO steps (TP=2 recipe) saving to ``tmp_path/name``, metrics to ``name.jsonl``, on
    the prompts and tokenizer in ``inputs`` (default ``tmp_path``); later ``--set`` in ``extra``
    override the earlier ones."""
    proc = subprocess.run(_command(tmp_path, name, steps, *extra, inputs=inputs), capture_output=True, text=True,
                          timeout=900, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _command(tmp_path, name, steps, *extra, inputs=None) -> list[str]:
    inputs = inputs or tmp_path
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "megatron_r1v.train", "--config", str(REPO / "examples/configs/tiny_grpo_cpu.yaml"),
            "--set", f"data.train_path={inputs / 'data' / 'prompts.jsonl'}",
            "--set", f"data.tokenizer={inputs / 'tok'}",
            "--set", "logging.tensorboard_dir=null", "--set", f"train.steps={steps}",
            "--set", f"train.save_dir={tmp_path / name}", "--metrics-jsonl", str(tmp_path / f"{name}.jsonl"), *extra]


def _metrics(tmp_path, name) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


def test_four_grpo_steps_tp2_write_all_tags(tmp_path, served_12):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_r1v.checkpoint.torch_dist_io import TorchDistReader
    from megatron_r1v.models.r1v.presets import get_preset
    from megatron_r1v.rollout.hf_engine import HFRolloutEngine

    inputs, reward_args = served_12
    # Start from converted weights, as users do: transformers layout -> Megatron checkpoint.
    HFRolloutEngine.from_arch(get_preset("tiny-r1v-chat"), seed=3).model.save_pretrained(str(tmp_path / "hf"))
    convert = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tools/convert_checkpoint.py"), "import", "--hf-dir", str(tmp_path / "hf"), "--out",
         str(tmp_path / "mcore"), "--tp", "2", "--dtype", "fp32"], capture_output=True, text=True, env=ENV,
        timeout=600)
    assert convert.returncode == 0, convert.stderr[-4000:]
    proc = _run(tmp_path, "ckpt", 4, *reward_args, "--set", f"logging.tensorboard_dir={tmp_path / 'tb'}",
                "--set", f"model.checkpoint={tmp_path / 'mcore'}", "--set", "grpo.ppo_epochs=2",
                "--set", "rollout.tis_cap=2.0", inputs=inputs)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == [f"step {i}/4" for i in range(1, 5)]
    assert all("effective ratio" in line and "step time" in line for line in lines)

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    tags = stage_tags("grpo", tis=True)  # every tag the run emits (CPU: no device-memory tags)
    assert set(tags) <= scalars, sorted(set(tags) - scalars)
    for tag in tags:
        assert [e.step for e in events.Scalars(tag)] == [0, 1, 2, 3], tag
    metrics = _metrics(tmp_path, "ckpt")
    for m in metrics:
        assert 0.0 <= m["train/accuracy"] <= 1.0 and m["train/response_length"] > 0
        assert m["train/entropy"] > 0 and m["perf/step_time_s"] > m["perf/train_time_s"] > 0
        assert m["perf/step_time_s"] > m["perf/data_time_s"] > 0  # its prompts (and reused SSB prompts) prepared
        assert 0.0 <= m["ssb/effective_ratio_fresh"] <= m["ssb/effective_ratio_batch"] <= 1.0
        assert 0.0 < m["train/rm_reward"] < 1.0  # sigmoid-calibrated model scores
        # The HF engine and the trainer both run fp32 on CPU: their log-probs of the sampled
        # tokens differ by summation order only (TP=2 splits the vocabulary and the GEMMs),
        # so the importance weights stay at 1 and none is cut.
        assert 0.0 < m["rollout/logprob_abs_diff"] < 1e-4, m["rollout/logprob_abs_diff"]
        assert abs(m["rollout/tis_weight_mean"] - 1.0) < 1e-4 and m["rollout/tis_truncated_fraction"] == 0.0
    ratios = [(m["ssb/effective_ratio_fresh"], m["ssb/effective_ratio_batch"]) for m in metrics]
    print("effective ratios (fresh, batch):", ratios)  # measured (0, 0), (.5, .5), (.25, .75), (.25, 1)
    # The tiny random reward model's scores are nearly flat within a group (spreads of ~0.001-0.05
    # after the sigmoid); ssb.min_reward_std=0.01 sits inside that range, so some groups count
    # and some do not. Groups below it carry no advantage (a step without an effective group
    # has exactly zero loss: no std-amplified noise), the SSB tops batches up with buffered
    # effective groups, and the ratios move.
    assert "SSB effective groups: reward std >= 0.01" in proc.stdout, proc.stdout[-2000:]
    assert all((m["train/grpo_loss"] == 0.0) == (m["ssb/effective_ratio_batch"] == 0.0) for m in metrics), ratios
    assert any(batch > fresh for fresh, batch in ratios), ratios  # the top-up engaged
    assert len({fresh for fresh, _ in ratios}) > 1 and any(batch > 0 for _, batch in ratios), ratios
    assert metrics[0]["train/kl"] == 0.0 and metrics[-1]["train/kl"] > 0.0  # the adapter left its start
    assert metrics[-1]["ssb/size"] > 0
    # Frozen tensors end as the converted checkpoint had them (the run started from it);
    # the adapter trained.
    start, end = TorchDistReader(tmp_path / "mcore"), TorchDistReader(tmp_path / "ckpt" / "step_000004" / "model")
    assert start.keys() == end.keys()
    changed = {k for k in start.keys() if not torch.equal(start.read(k), end.read(k))}
    assert changed and all(k.startswith("adapter.") for k in changed), sorted(changed)[:5]



def test_resume_is_bit_identical(tmp_path, reward_tools, served_12, grpo_full):
    """6 steps in one run == a run whose reward server goes down after its first step and
    comes back within the retry budget (the run goes on), then goes down for good (past
    the budget the run stops with a checkpoint of the last finished step and exit 1),
    then --resume with a server up: metrics, weights, optimizer, SSB. (trainer/failure.py)"""
    import socket
    import time

    import torch

    from megatron_r1v.checkpoint.torch_dist_io import TorchDistReader

    def wait_for_steps(count):
        deadline = time.monotonic() + 600
        while len(_metrics(tmp_path, "split") if (tmp_path / "split.jsonl").exists() else []) < count:
            assert split.poll() is None and time.monotonic() < deadline, split.communicate()[1][-4000:]
            time.sleep(0.2)

    with socket.socket() as sock:  # one port for the server and its restart
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    inputs, reward_args = served_12  # the served reward model (module fixture) stays up
    every3 = [*reward_args, "--set", "train.save_interval=3"]
    with reward_tools.serve(inputs / "rm", tmp_path / "rm2.log", "--port", str(port)) as second:
        split = subprocess.Popen(
            _command(tmp_path, "split", 6, *every3, "--set", f"reward.reward_model_url={second['url']}",
                     "--set", "reward.model_retry_s=20", "--set", "reward.model_backoff_s=0.5", inputs=inputs),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
        wait_for_steps(1)
    time.sleep(1.0)  # down, then back on the same port well within the 20 s budget
    with reward_tools.serve(inputs / "rm", tmp_path / "rm3.log", "--port", str(port)):
        wait_for_steps(3)
    # The server is gone for good (past the 20 s retry budget): the run stops safely.
    out, err = split.communicate(timeout=600)
    status = json.loads((tmp_path / "split" / "run_status.json").read_text())
    done = status["completed_steps"]
    assert split.returncode != 0 and status["state"] == "failed" and 3 <= done < 6, out[-2000:] + err[-4000:]
    assert "RewardServerError: reward model server at" in status["error"] and "retry budget" in status["error"]
    assert status["checkpoint"] == f"step_{done:06d}"  # a stop checkpoint, not only the every-3 ones
    assert (tmp_path / "split" / "latest").read_text().strip() == f"step_{done:06d}"
    assert f"error: step {done + 1}/6 failed: rank 0: RewardServerError" in err
    assert f"holds the state after step {done}; fix the cause and continue with --resume" in err
    assert err.count("attempt 1 failed") >= 2  # every retry was logged, in both outages
    assert [m["step"] for m in _metrics(tmp_path, "split")] == list(range(done))
    # The server is back (the first one, still up): resume for the remaining steps.
    proc = _run(tmp_path, "split", 6, *every3, "--resume", inputs=inputs)
    assert "resumed from" in proc.stdout and f"after step {done}" in proc.stdout
    full, split = _metrics(grpo_full, "full"), _metrics(tmp_path, "split")
    assert [m["step"] for m in split] == list(range(6))
    drop = ("perf/",)  # timings differ; everything else, the gradient norm included, must not
    assert len(full) == len(split) == 6
    for a, b in zip(full, split):
        assert {k: v for k, v in a.items() if not k.startswith(drop)} == \
               {k: v for k, v in b.items() if not k.startswith(drop)}, a["step"]
    assert any(m["train/grpo_loss"] != 0 for m in full)
    end_full, end_split = grpo_full / "full" / "step_000006", tmp_path / "split" / "step_000006"
    a, b = TorchDistReader(end_full / "model"), TorchDistReader(end_split / "model")
    assert a.keys() == b.keys() and len(a.keys()) > 20
    for key in a.keys():
        assert torch.equal(a.read(key), b.read(key)), key
    # Adam's moments and the KL reference (state/), and Adam's step count (its common part).
    sa, sb = TorchDistReader(end_full / "state"), TorchDistReader(end_split / "state")
    assert sa.keys() == sb.keys() and any(k.startswith("optimizer/exp_avg_sq/") for k in sa.keys())
    for key in sa.keys():
        assert torch.equal(sa.read(key), sb.read(key)), key
    common = [torch.load(end / "state" / "common.pt", weights_only=False) for end in (end_full, end_split)]
    assert common[0] == common[1] and common[0]["common"]["optimizer"]["step"] == 6
    start = TorchDistReader(tmp_path / "split" / f"step_{done:06d}" / "model")
    assert any(not torch.equal(start.read(k), a.read(k)) for k in a.keys() if "adapter" in k)  # it trained


def test_prompt_pool_store_seeds_the_grpo_buffer(tmp_path, reward_tools):
    """The offline prompt pool, scored with the run's reward (the served image-aware model and
    the run's ssb.min_reward_std), writes its effective groups into an SSB store; a GRPO run
    with ssb.initial_store starts with them in its buffer."""
    from megatron_r1v.models.r1v.presets import get_preset
    from megatron_r1v.rollout.hf_engine import HFRolloutEngine

    with served_reward(tmp_path, reward_tools, 8, seed=2) as reward_args:
        HFRolloutEngine.from_arch(get_preset("tiny-r1v-chat"), seed=3).model.save_pretrained(str(tmp_path / "hf"))
        # The run's rollout settings (tiny_grpo_cpu.yaml: 4 samples at temperature 1, 24 new
        # tokens, 2 tiles), so the store fits it.
        pool = subprocess.run(
            [sys.executable, "-m", "megatron_r1v.ssb.prompt_pool",
             "--prompts", str(tmp_path / "data" / "prompts.jsonl"), "--model", str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "tok"), "--samples", "4",
             "--max-new-tokens", "24", "--max-tiles", "2", "--temperature", "1.0", "--out", str(tmp_path / "pool"),
             "--ssb-store", str(tmp_path / "store"), "--tiler", "pil", "--tiler-threads", "1", *reward_args],
            capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
        assert pool.returncode == 0, pool.stdout[-2000:] + pool.stderr[-4000:]
        stats = json.loads(pool.stdout.strip().splitlines()[-1])
        print("prompt pool:", stats)
        assert stats["prompts"] == 8 and stats["min_reward_std"] == 0.01 and stats["ssb_groups"] == stats["kept"] >= 1
        assert stats["kept"] + stats["dropped_all_equal_other"] + stats["dropped_below_min_std"] == 8, stats
        proc = _run(tmp_path, "seeded", 1, *reward_args, "--set", f"ssb.initial_store={tmp_path / 'store'}")
    assert f"SSB: loaded {stats['kept']} groups from ssb.initial_store {tmp_path / 'store'}" in proc.stdout, \
        proc.stdout[-3000:]
    (metrics,) = _metrics(tmp_path, "seeded")
    # The stored groups are in the buffer from the start: a batch with ineffective fresh groups
    # is topped up from them.
    assert metrics["ssb/size"] >= stats["kept"] or metrics["ssb/effective_ratio_batch"] > \
        metrics["ssb/effective_ratio_fresh"], metrics
    assert metrics["ssb/effective_ratio_batch"] == 1.0, metrics


def test_resume_at_other_layouts(tmp_path, served_12, grpo_full):
    """The TP=2 checkpoint of step 3 resumes at PP=2 (the second stage holds no trainable
    parameter: adapter-only training) for steps 4-5, whose checkpoint then resumes at TP=1 x
    DP=2 (PP 2 -> 1 and DP 1 -> 2) for step 6: the model, Adam's state, the KL reference
    weights and the SSB are read in the new layout's pieces (trainer/checkpoint.py). The run
    continues as the uninterrupted one: at PP=2 one engine samples from the same weights; at
    DP=2 each replica's engine samples its half of the prompts, each prompt from the random
    stream of its position in the step (rollout/hf_engine.py), and the SSB drops and draws by
    the step's order, not by rank (ssb/policy.py). Differences are fp32 summation orders (other
    shards, batch shapes, a DP all-reduce). Measured over steps 4-6: the same responses (equal
    lengths and rewards), the loss (~2e-3, a sum of cancelling terms) at most 3.0e-8 apart, the
    engine gap metric (~1.5e-7 itself) 7.0e-8 apart, the KL (~5e-4) within 8.3e-6 relative,
    everything else within 2e-7 relative; so rel 2e-5 with an absolute floor of 5e-7 (a
    different batch or state moves the loss by ~1e-3, the rewards by > 1e-2)."""
    inputs, reward_args = served_12
    full = _metrics(grpo_full, "full")
    (tmp_path / "pp2").mkdir()
    shutil.copytree(grpo_full / "full" / "step_000003", tmp_path / "pp2" / "step_000003")
    (tmp_path / "pp2" / "latest").write_text("step_000003\n")
    proc = _run(tmp_path, "pp2", 6, *reward_args, "--resume", "--set", "parallel.tp=1", "--set", "parallel.pp=2",
                "--stop-after", "2", inputs=inputs)
    assert "after step 3" in proc.stdout and "saved at {'tp': 2, 'pp': 1, 'dp': 1" in proc.stdout
    # The PP=2 run's checkpoint of step 5 at TP=1 x DP=2 for the last step.
    dp2 = _run(tmp_path, "pp2", 6, *reward_args, "--resume", "--set", "parallel.tp=1", inputs=inputs)
    assert "after step 5" in dp2.stdout and "saved at {'tp': 1, 'pp': 2, 'dp': 1" in dp2.stdout
    resumed = _metrics(tmp_path, "pp2")
    assert [m["step"] for m in resumed] == [3, 4, 5]
    assert all(m["ssb/size"] > 0 for m in resumed)  # the buffer came along
    assert full[5]["ssb/reused_groups"] > 0  # the top-up drew (and dropped) in the DP=2 step
    assert resumed[2]["train/response_length"] == full[5]["train/response_length"]  # the very same responses
    for a, b in zip(full[3:], resumed):
        expected = {k: v for k, v in a.items() if not k.startswith("perf/")}
        assert {k: v for k, v in b.items() if not k.startswith("perf/")} == pytest.approx(
            expected, rel=2e-5, abs=5e-7), a["step"]
    assert_same_reference(grpo_full / "full" / "step_000003", tmp_path / "pp2" / "step_000006")


def assert_same_reference(start: Path, end: Path) -> None:
    """The KL's anchor (the run's initial trainable weights) is the same in both checkpoints."""
    import torch

    from megatron_r1v.checkpoint.torch_dist_io import TorchDistReader

    first, last = TorchDistReader(start / "state"), TorchDistReader(end / "state")
    refs = sorted(k for k in first.keys() if k.startswith("reference/"))
    assert refs and refs == sorted(k for k in last.keys() if k.startswith("reference/"))
    assert all(torch.equal(first.read(k), last.read(k)) for k in refs), end


ASYNC = ["--set", "rollout.mode=async", "--set", "train.save_interval=2"]


@pytest.fixture(scope="module")
def grpo_async(tmp_path_factory, served_12):
    """``rollout.mode async`` on the recipe of ``grpo_full``: 3 of its 6 steps, checkpoints after
    steps 2 and 3 (the second with step 4's rollout in flight, waited for); its folder."""
    root = tmp_path_factory.mktemp("grpo_async")
    inputs, reward_args = served_12
    _run(root, "async", 6, *reward_args, *ASYNC, "--stop-after", "3", inputs=inputs)
    return root


def test_async_rollout_overlaps_and_resumes_exactly(tmp_path, served_12, grpo_full, grpo_async):
    """``rollout.mode async`` (``grpo_async``) against the sync run ``grpo_full``:

    - Step 1 samples from the initial weights in both modes with the same seed: the same
      responses, rewards and SSB metrics as the sync run's, exactly; the loss terms differ only
      by the TIS weights async mode applies, exp(engine gap) with gaps ~1e-7: the loss (~1e-8,
      a sum of cancelling terms) within 1e-7 absolute, the gradient norm within 1e-6 relative.
    - From step 2 on the engine samples from the weights one step back while the trainer's
      old log-probs are the updated policy's: after a step that changed the weights the engine
      gap (~1e-7 in sync mode: numerics only) is orders of magnitude larger; the TIS weights are
      logged (async default cap), and generation overlapped training (perf/overlap_s > 0; 0 in
      sync mode).
    - The step-2 checkpoint holds step 3's rollout: resumed at the same layout, step 3 is the
      uninterrupted run's bit for bit; resumed at TP=1 x DP=2, the two replicas share the
      saved rollout out by position and the step equals the uninterrupted one to fp32
      summation order."""
    inputs, reward_args = served_12
    run = [*reward_args, *ASYNC]
    sync, async_ = _metrics(grpo_full, "full"), _metrics(grpo_async, "async")
    assert [m["step"] for m in async_] == [0, 1, 2]

    def same(m):
        return {k: v for k, v in m.items() if not k.startswith(("perf/", "rollout/tis"))}
    assert same(async_[0]) == pytest.approx(same(sync[0]), rel=1e-6, abs=1e-7)
    assert {k: v for k, v in same(async_[0]).items() if k.startswith(("train/reward", "train/rm", "ssb/"))} == \
        {k: v for k, v in same(sync[0]).items() if k.startswith(("train/reward", "train/rm", "ssb/"))}
    for a, s in zip(async_[1:], sync[1:3]):
        assert a["perf/overlap_s"] > 0 and s["perf/overlap_s"] == 0 and s["perf/rollout_wait_s"] > 0
        assert 0 < a["rollout/tis_weight_mean"] <= 2.0
    # A step after one that changed the weights (a step of only flat groups has no gradient).
    stale = [(a, s) for before, a, s in zip(async_, async_[1:], sync[1:3]) if before["train/grad_norm"] > 0]
    assert stale, [m["train/grad_norm"] for m in async_]
    for a, s in stale:
        assert a["rollout/logprob_abs_diff"] > 100 * max(s["rollout/logprob_abs_diff"], 1e-9), (a, s)
    assert (grpo_async / "async" / "step_000002" / "pending_rollout" / "dp_00000.pt").is_file()
    for name, sets in (("same", []), ("tp1dp2", ["--set", "parallel.tp=1"])):
        (tmp_path / name).mkdir()
        shutil.copytree(grpo_async / "async" / "step_000002", tmp_path / name / "step_000002")
        (tmp_path / name / "latest").write_text("step_000002\n")
        _run(tmp_path, name, 6, *run, "--resume", *sets, "--stop-after", "1", inputs=inputs)
    resumed, resharded = _metrics(tmp_path, "same")[0], _metrics(tmp_path, "tp1dp2")[0]
    assert {k: v for k, v in resumed.items() if not k.startswith("perf/")} == \
        {k: v for k, v in async_[2].items() if not k.startswith("perf/")}
    # At DP=2 the same step to fp32 summation order (test_resume_at_other_layouts's tolerance).
    assert {k: v for k, v in resharded.items() if not k.startswith("perf/")} == pytest.approx(
        {k: v for k, v in async_[2].items() if not k.startswith("perf/")}, rel=2e-5, abs=5e-7)
    assert resharded["train/grpo_loss"] != 0.0 and resharded["train/kl"] > 0.0
    assert resharded["ssb/size"] > 0  # the buffer came along
    assert_same_reference(grpo_async / "async" / "step_000002", tmp_path / "tp1dp2" / "step_000003")


def test_async_step_failure_keeps_its_rollout_and_resumes_exactly(tmp_path, served_12, grpo_async):
    """A NaN gradient on rank 1 in step 2 of the async run (``tests/e2e/fault_train.py``): the step
    fails after it took step 2's rollout and started step 3's; the stop checkpoint after step 1
    holds step 2's rollout (put back, generated during step 1) and drops the one in flight, and
    --resume trains steps 2 and 3 exactly as the uninterrupted async run did."""
    inputs, reward_args = served_12
    command = _command(tmp_path, "split", 6, *reward_args, *ASYNC, inputs=inputs)
    module = command.index("megatron_r1v.train")  # "-m megatron_r1v.train" -> the fault-injecting script
    command[module - 1:module + 1] = [str(REPO / "tests" / "e2e" / "fault_train.py")]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                            env=dict(ENV, R1V_FAULT="nan:1:2"))
    status = json.loads((tmp_path / "split" / "run_status.json").read_text())
    assert failed.returncode != 0 and status["completed_steps"] == 1, failed.stderr[-4000:]
    assert status["checkpoint"] == "step_000001" and "non-finite gradients" in status["error"]
    saved = torch_load(tmp_path / "split" / "step_000001" / "pending_rollout" / "dp_00000.pt")
    assert saved["step"] == 1 and saved["version"] == 0 and saved["samples"] is not None
    _run(tmp_path, "split", 6, *reward_args, *ASYNC, "--resume", "--stop-after", "2", inputs=inputs)
    uninterrupted = _metrics(grpo_async, "async")
    resumed = _metrics(tmp_path, "split")
    assert [m["step"] for m in resumed] == [0, 1, 2]
    for a, b in zip(uninterrupted, resumed):
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == \
            {k: v for k, v in b.items() if not k.startswith("perf/")}, a["step"]


def torch_load(path: Path):
    import torch

    return torch.load(path, weights_only=False)
