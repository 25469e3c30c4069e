"""The offline prompt-pool filter: group verdicts, output files, and the CLI on a tiny model."""

import json

import pytest

from megatron_r1v.data.schema import load_records
from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.tokenizer import build_tokenizer
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.rewards.hybrid import RewardBreakdown
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
