"""The offline prompt-pool filter: group verdicts, output files, and the CLI on a tiny model."""

import json

import numpy as np
import pytest
import torch
from reward_stub import StandInRewardServer  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.data.schema import load_records
from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.tokenizer import build_tokenizer
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.rewards.hybrid import RewardBreakdown
from megatron_r1v.rollout.engine import RolloutSample
from megatron_r1v.rollout.hf_engine import HFRolloutEngine
from megatron_r1v.ssb.prompt_pool import PoolStats, classify_group, main, write_pool


def scores(*pairs):
    return [RewardBreakdown(total=t, rule=r, format=1.0, model=0.0, model_raw=None, parsed_answer=None,
                            format_reason="ok") for t, r in pairs]


def test_classify_group():
    assert classify_group(scores((2.0, 1.0), (2.0, 1.0), (2.0, 1.0))) == "all_correct"
    assert classify_group(scores((0.0, 0.0), (0.0, 0.0))) == "all_equal"
    assert classify_group(scores((1.0, 0.0), (1.0, 0.0))) == "all_equal"  # all formatted, all wrong
    assert classify_group(scores((2.0, 1.0), (1.0, 0.0), (1.0, 0.0))) == "keep"


def test_write_pool_keeps_lines_and_absolutizes_images(tmp_path):
    generate_dataset(tmp_path / "data", 4, seed=1)
    prompts = tmp_path / "data" / "prompts.jsonl"
    records = load_records(prompts, "prompts").records
    out = write_pool(prompts, records[1:3], PoolStats(prompts=4, kept=2), tmp_path / "pool")
    lines = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [str(r["id"]) for r in lines] == [records[1].id, records[2].id]
    assert lines[0]["images"] == [str(records[1].images[0])]
    assert load_records(out / "prompts.jsonl", "prompts").records == records[1:3]  # still valid, same records
    assert json.loads((out / "stats.json").read_text())["kept"] == 2
    with pytest.raises(FileExistsError, match="pool exists; pass --force"):
        write_pool(prompts, records, PoolStats(), tmp_path / "pool")


def test_cli_on_a_tiny_random_model(tmp_path, capsys):
    generate_dataset(tmp_path / "data", 5, seed=2)
    build_tokenizer([tmp_path / "data" / "prompts.jsonl"], 640, tmp_path / "model")
    engine = HFRolloutEngine.from_arch(get_preset("tiny-r1v-chat"), seed=0)
    engine.model.save_pretrained(str(tmp_path / "model"))
    args = ["--prompts", str(tmp_path / "data" / "prompts.jsonl"), "--model", str(tmp_path / "model"),
            "--samples", "3", "--max-new-tokens", "6", "--max-tiles", "2", "--out", str(tmp_path / "pool")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # A random model never writes "</think> ... \boxed{}": every reward is 0, every group flat.
    assert summary["prompts"] == 5 and summary["kept"] == 0 and summary["dropped_all_equal_other"] == 5
    assert summary["mean_reward"] == 0.0
    assert summary["tiler"] == "dali (r1v.internvl_tiles, 2 threads)"  # --tiler auto, DALI installed here
    assert (tmp_path / "pool" / "prompts.jsonl").read_text() == ""
    with pytest.raises(FileExistsError):
        main(args)


# --- the run's reward (a stand-in reward-model server), GRPO's criterion, the SSB store -------

# Reward-model score of response k of prompt i (rule and format weights 0, calibration none:
# the total is the score). Unbiased stds: flat; 0.0577; 0.1; 1.0; 0.0289.
TABLE = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.1], [0.0, 0.1, 0.2], [1.0, -1.0, 0.0], [0.05, 0.0, 0.0]]


def test_classify_group_with_the_effective_criterion():
    spread = scores((1.0, 0.0), (1.0, 0.0), (1.1, 0.0))  # std 0.0577
    assert classify_group(spread) == classify_group(spread, 0.05) == "keep"
    assert classify_group(spread, 0.06) == "below_min_std"
    assert classify_group(scores((2.0, 1.0), (2.0, 1.0)), 0.06) == "all_correct"  # flat stays flat
    assert classify_group(scores((0.0, 0.0), (0.0, 0.0)), 0.06) == "all_equal"


@pytest.fixture(scope="module")
def pool_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    generate_dataset(root / "data", 5, seed=2)
    build_tokenizer([root / "data" / "prompts.jsonl"], 640, root / "model")
    HFRolloutEngine.from_arch(get_preset("tiny-r1v-chat"), seed=0).model.save_pretrained(str(root / "model"))
    records = load_records(root / "data" / "prompts.jsonl", "prompts").records
    return {"root": root, "prompts": root / "data" / "prompts.jsonl", "model": root / "model",
            "index": {r.id: i for i, r in enumerate(records)}}


def _fake_generate(index):
    def generate(self, requests, params):
        return [[RolloutSample(req.prompt_id, torch.arange(3 + k) + 10 * index[req.prompt_id],
                               -0.25 * (torch.arange(3 + k, dtype=torch.float32) + 1), True,
                               f"reply {index[req.prompt_id]} {k}")
                 for k in range(params.n)] for req in requests]

    return generate


def _table_score(text):
    _, i, k = text.split()
    return TABLE[int(i)][int(k)]


def _pool_args(setup, out, *extra):
    return ["--prompts", str(setup["prompts"]), "--model", str(setup["model"]), "--samples", "3",
            "--max-new-tokens", "4", "--max-tiles", "2", "--tiler", "pil", "--tiler-threads", "1",
            "--out", str(out), "--set", "reward.rule_weight=0", "--set", "reward.format_weight=0",
            "--set", "reward.model_weight=1", "--set", "reward.model_retry_s=0", *extra]


def test_pool_scores_with_the_run_reward_and_writes_an_ssb_store(pool_setup, tmp_path, monkeypatch, capsys):
    from megatron_r1v.ssb import load, prompt_pool, read_metadata

    monkeypatch.setattr(HFRolloutEngine, "generate", _fake_generate(pool_setup["index"]))
    written = []
    real_write = prompt_pool.write_ssb_store
    monkeypatch.setattr(prompt_pool, "write_ssb_store", lambda groups, *a: written.append(groups) or real_write(
        groups, *a))
    server = StandInRewardServer(_table_score)
    try:
        assert main(_pool_args(pool_setup, tmp_path / "pool", "--set", f"reward.reward_model_url={server.url}",
                               "--set", "ssb.min_reward_std=0.08", "--ssb-store", str(tmp_path / "store"))) == 0
    finally:
        server.close()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(server.items) == 15 and server.items[0]["response"] == "reply 0 0"  # the model term was asked
    assert (summary["kept"], summary["dropped_all_equal_other"], summary["dropped_below_min_std"],
            summary["dropped_all_correct"], summary["min_reward_std"]) == (2, 1, 2, 0, 0.08)
    assert summary["ssb_groups"] == 2
    # The store loads back bit for bit, as GRPO would have buffered the groups (step 0).
    groups = sorted(written[0], key=lambda g: g.uid)
    loaded = load(tmp_path / "store").groups
    assert len(loaded) == 2 and all(a.same_content(b) for a, b in zip(loaded, groups))
    by_prompt = {pool_setup["index"][g.prompt_id]: g for g in loaded}
    assert sorted(by_prompt) == [2, 3] and all(g.step == 0 for g in loaded)
    group = by_prompt[3]
    np.testing.assert_array_equal(group.rewards["total"], TABLE[3])
    np.testing.assert_allclose(group.advantages, [1.0, -1.0, 0.0], atol=1e-5)  # (r - mean) / (std + eps)
    np.testing.assert_array_equal(group.old_logprobs[1], [-0.25, -0.5, -0.75, -1.0])
    np.testing.assert_array_equal(group.token_ids[1][-4:], np.arange(4) + 30)
    assert group.loss_mask[1].tolist() == [True] * 4
    origin = read_metadata(tmp_path / "store").origin
    assert (origin["n_samples"], origin["temperature"], origin["max_tiles"]) == (3, 1.0, 2)


def test_pool_reads_reward_and_criterion_from_a_run_config(pool_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(HFRolloutEngine, "generate", _fake_generate(pool_setup["index"]))
    server = StandInRewardServer(_table_score)
    run = tmp_path / "run.yaml"
    run.write_text(f"reward:\n  rule_weight: 0\n  format_weight: 0\n  model_weight: 1\n  model_retry_s: 0\n"
                   f"  reward_model_url: {server.url}\nssb:\n  min_reward_std: auto\n")
    try:
        args = ["--prompts", str(pool_setup["prompts"]), "--model", str(pool_setup["model"]), "--samples", "3",
                "--max-tiles", "2", "--tiler", "pil", "--out", str(tmp_path / "pool"), "--reward-config", str(run)]
        assert main(args) == 0
    finally:
        server.close()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # auto with a continuous model term (calibration none, weight 1): 1 x 0.2 logits; no rule/format cap.
    assert summary["min_reward_std"] == pytest.approx(0.2)
    assert (summary["kept"], summary["dropped_below_min_std"], summary["dropped_all_equal_other"]) == (1, 3, 1)


@pytest.mark.parametrize("extra, message", [
    (("--set", "train.steps=3"), "--set 'train.steps=3': only reward.* keys and ssb.min_reward_std can be set"),
    (("--set", "ssb.min_reward_std=-1"), "--reward-config / --set: ssb.min_reward_std must be 'auto' or a finite"),
    (("--samples", "1"), "--samples must be >= 2"),
    (("--reward-config", "/nonexistent.yaml"), "--reward-config / --set: config file /nonexistent.yaml does not"),
])
def test_pool_argument_errors_before_loading(pool_setup, tmp_path, monkeypatch, capsys, extra, message):
    def never(*args, **kwargs):
        raise AssertionError("loaded the model despite a user error")

    monkeypatch.setattr("megatron_r1v.rollout.hf_engine.load_hf_engine", never)
    args = _pool_args(pool_setup, tmp_path / "pool", "--set", "reward.reward_model_url=http://127.0.0.1:9", *extra)
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_pool_with_its_reward_server_down_fails_before_loading(pool_setup, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("loaded the model despite the reward server being down")

    monkeypatch.setattr("megatron_r1v.rollout.hf_engine.load_hf_engine", never)
    server = StandInRewardServer(_table_score)
    url = server.url
    server.close()
    assert main(_pool_args(pool_setup, tmp_path / "pool", "--set", f"reward.reward_model_url={url}")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: reward model server at {url}/health failed")
    assert "or set reward.model_weight=0" in err and not (tmp_path / "pool").exists()
    (tmp_path / "store").mkdir()
    with pytest.raises(FileExistsError, match="--ssb-store .*store exists; pass --force"):
        main(_pool_args(pool_setup, tmp_path / "pool", "--ssb-store", str(tmp_path / "store")))
