"""trainer/metrics.py: declared tags, and one logger for the progress line, TensorBoard and JSONL."""

import json

import pytest
import torch

from megatron_r1v.trainer.metrics import (
    COMMON_TAGS,
    DEVICE_MEMORY_TAGS,
    GRPO_TAGS,
    MPO_TAGS,
    SFT_TAGS,
    TIS_TAGS,
    MetricsLogger,
    stage_tags,
)

MPO_STEP = {"mpo/loss": 1.5, "mpo/pref_loss": 0.7, "mpo/quality_loss": 0.3, "mpo/gen_loss": 0.5,
            "mpo/reward_margin": 0.25, "mpo/accuracy": 0.75, "mpo/delta": 0.0, "mpo/chosen_reward": 0.1,
            "mpo/rejected_reward": -0.15, "train/grad_norm": 2.0, "perf/step_time_s": 1.0,
            "perf/data_time_s": 0.25}
SFT_STEP = {"sft/loss": 2.5, "sft/tokens_per_s": 1234.0, "sft/assistant_tokens": 300.0, "sft/lr": 1e-3,
            "train/grad_norm": 1.0, "perf/step_time_s": 0.5, "perf/data_time_s": 0.1}


def test_stage_tags_are_complete_and_distinct():
    assert set(MPO_STEP) == set(MPO_TAGS) and set(SFT_STEP) == set(SFT_TAGS)
    for tags in (MPO_TAGS, SFT_TAGS, GRPO_TAGS + TIS_TAGS):
        assert len(set(tags)) == len(tags)
    # The three the GRPO list used to miss.
    assert {"train/grad_norm", "ssb/reused_groups", "ssb/aged_out"} <= set(GRPO_TAGS)
    assert "perf/data_time_s" in GRPO_TAGS and "perf/data_time_s" in MPO_TAGS
    assert stage_tags("grpo") == GRPO_TAGS + COMMON_TAGS
    assert stage_tags("grpo", tis=True, device=torch.device("cuda")) == GRPO_TAGS + TIS_TAGS + COMMON_TAGS \
        + DEVICE_MEMORY_TAGS
    assert stage_tags("sft") == SFT_TAGS + COMMON_TAGS
    with pytest.raises(ValueError, match="no metrics are declared for stage 'dpo'"):
        stage_tags("dpo")


def test_sft_progress_line(capsys):
    with MetricsLogger(stage_tags("sft"), stage="sft", total_steps=3, log_interval=1, device=torch.device("cpu"),
                       is_rank0=True) as logger:
        logged = logger.log(2, SFT_STEP, lr=1e-3)
    assert logged["train/lr"] == logged["sft/lr"] == 1e-3
    assert capsys.readouterr().out == ("step 3/3 | loss 2.5000 | 300 assistant tokens | 1234 tokens/s | lr 1.000e-03 | "
                                       "step time 0.5s\n")


def test_rank0_writes_every_sink(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    jsonl = tmp_path / "metrics.jsonl"
    with MetricsLogger(stage_tags("mpo"), stage="mpo", total_steps=5, log_interval=2, device=torch.device("cpu"),
                       is_rank0=True, tensorboard_dir=str(tmp_path / "tb"), jsonl_path=str(jsonl)) as logger:
        for step in range(5):
            logged = logger.log(step, dict(MPO_STEP, **{"mpo/loss": 1.5 - step / 10}), lr=1e-3)
    assert logged["train/lr"] == 1e-3 and logged["perf/host_rss_gb"] > 0.01
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in printed] == ["step 1/5", "step 3/5", "step 5/5"]  # interval 2 + last
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4] and lines[3]["mpo/loss"] == pytest.approx(1.2)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(stage_tags("mpo")) <= set(events.Tags()["scalars"])
    assert [round(e.value, 6) for e in events.Scalars("mpo/loss")] == [1.5, 1.4, 1.3, 1.2, 1.1]


def test_other_ranks_write_nothing_and_undeclared_tags_are_refused(tmp_path, capsys):
    logger = MetricsLogger(stage_tags("mpo"), stage="mpo", total_steps=1, log_interval=1,
                           device=torch.device("cpu"), is_rank0=False, tensorboard_dir=str(tmp_path / "tb"),
                           jsonl_path=str(tmp_path / "m.jsonl"))
    logger.log(0, MPO_STEP, lr=0.1)
    logger.close()
    assert not (tmp_path / "tb").exists() and not (tmp_path / "m.jsonl").exists() and capsys.readouterr().out == ""
    with pytest.raises(KeyError, match=r"metrics \['mpo/new_thing'\] are not declared"):
        logger.log(0, dict(MPO_STEP, **{"mpo/new_thing": 1.0}), lr=0.1)
    with pytest.raises(ValueError, match="logging.log_interval must be >= 1"):
        MetricsLogger(stage_tags("mpo"), stage="mpo", total_steps=1, log_interval=0, device=torch.device("cpu"),
                      is_rank0=True)
