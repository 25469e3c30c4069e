"""grpo.dynamic_sampling (DAPO, arXiv 2503.14476 Sec. 3.2): the selection rule by hand, and the
trainer's round loop on stubbed rollouts, on one rank and on two gloo ranks (DP=2)."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_r1v.config import RunConfig
from megatron_r1v.trainer.grpo import GRPOTrainer
from megatron_r1v.trainer.grpo_batch import DynamicSamplingStats, ScoredGroup, dynamic_sampling_quota
from megatron_r1v.trainer.metrics import DYNAMIC_SAMPLING_TAGS, GRPO_TAGS, stage_tags


def test_quota_keeps_everything_within_the_target():
    assert dynamic_sampling_quota([0, 0], [2, 1], 4) == [2, 1]
    assert dynamic_sampling_quota([1, 1], [1, 1], 4) == [1, 1]  # exactly the target
    assert dynamic_sampling_quota([3, 1], [5, 5], 4) == [0, 0]  # already full


def test_quota_cuts_the_surplus_evenly_and_deterministically():
    # room 3: one at a time to the rank holding the fewest; rank 1 holds 0, 1, 2 -> takes all 3.
    assert dynamic_sampling_quota([3, 0], [2, 3], 6) == [0, 3]
    # room 3 from sizes [1, 1]: rank 0 (tie: lowest), rank 1, then rank 0 again (tie at 2).
    assert dynamic_sampling_quota([1, 1], [3, 3], 5) == [2, 1]
    # A rank cannot give more than it has: rank 1's single group, the rest from rank 0.
    assert dynamic_sampling_quota([2, 0], [2, 1], 4) == [1, 1]
    assert dynamic_sampling_quota([0, 0, 0, 0], [0, 4, 1, 4], 5) == [0, 2, 1, 2]
    with pytest.raises(ValueError, match="one count per rank"):
        dynamic_sampling_quota([0], [1, 1], 2)


def _group(effective: bool) -> ScoredGroup:
    totals = np.array([1.0, 0.0] if effective else [0.5, 0.5])
    return ScoredGroup([np.array([5]), np.array([6])], [np.zeros(1, np.float32)] * 2,
                       {"total": totals, "rule": totals, "format": np.zeros(2), "model": np.zeros(2)})


class StubTrainer:
    """The trainer's round loop over scripted rollouts: ``rounds[k]`` lists this rank's groups of
    round k as effective or not; items are named ``r<round>g<index>``."""

    _dynamic_sampling = GRPOTrainer._dynamic_sampling

    def __init__(self, rounds: list[list[bool]], prompts_per_step: int, max_rounds: int, dp_rank: int = 0,
                 dp_group=None):
        self.cfg = RunConfig()
        self.cfg.grpo.dynamic_sampling, self.cfg.grpo.prompts_per_step = True, prompts_per_step
        self.cfg.grpo.dynamic_sampling_max_rounds = max_rounds
        self.ctx = SimpleNamespace(dp_group=dp_group, dp_rank=dp_rank, rank=dp_rank)
        self.min_reward_std, self.rounds, self.calls = 0.0, rounds, []
        self.world = 1 if dp_group is None else dist.get_world_size(dp_group)

    def _rollout_round(self, step: int, round_: int = 0):
        self.calls.append(round_)  # the loader draws prompts_per_step prompts per call
        flags = self.rounds[round_]
        positions = [i * self.world + self.ctx.dp_rank for i in range(len(flags))]  # the loader's round-robin
        return [f"r{round_}g{i}" for i in range(len(flags))], positions, [_group(f) for f in flags]


def test_rounds_until_the_target_then_the_surplus_is_cut(capsys):
    trainer = StubTrainer([[True, False, False, True], [False, True, True, True], [True] * 4], 4, 3)
    items, positions, groups, stats = trainer._dynamic_sampling(step=0)
    assert trainer.calls == [0, 1]  # two rounds: 2 + 3 effective >= 4
    assert items == ["r0g0", "r0g3", "r1g1", "r1g2"]  # the surplus r1g3 goes (rollout order)
    assert positions == [0, 3, 5, 6]  # in the step's order over both rounds (round 1 from 4 on)
    assert stats == DynamicSamplingStats(rounds=2, drawn_groups=8, kept_groups=4, target=4)
    assert stats.metrics() == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/kept_fraction": 0.5}
    assert all(g.advantages().any() for g in groups)
    assert "dynamic sampling" not in capsys.readouterr().out


def test_max_rounds_trains_on_what_was_collected(capsys):
    trainer = StubTrainer([[True, False], [False, False], [False, True], [True, True]], 4, 3)
    items, _, _, stats = trainer._dynamic_sampling(step=6)
    assert trainer.calls == [0, 1, 2] and items == ["r0g0", "r2g1"]
    assert stats.metrics() == {"dynamic_sampling/rounds": 3.0, "dynamic_sampling/kept_fraction": 2 / 6}
    assert ("dynamic sampling: step 7: 2 of 4 effective groups after grpo.dynamic_sampling_max_rounds=3 rounds "
            "(6 groups drawn); training on what was collected") in capsys.readouterr().out


def test_a_rank_without_effective_groups_keeps_its_first_one():
    trainer = StubTrainer([[False, False], [False, False]], 2, 2)
    items, positions, groups, stats = trainer._dynamic_sampling(step=0)
    assert items == ["r0g0"] and positions == [0] and not groups[0].advantages().any()
    assert stats.kept_groups == 0 and stats.metrics()["dynamic_sampling/kept_fraction"] == 0.0


def _dp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # Rank 0's rollouts are all effective, rank 1's mostly not: the decision still has to agree.
    rounds = [[[True, True], [True, True], [True, True]], [[False, False], [True, False], [False, False]]][rank]
    trainer = StubTrainer(rounds, 4, 3, dp_rank=rank, dp_group=dist.group.WORLD)
    items, positions, _, stats = trainer._dynamic_sampling(step=0)
    torch.save({"items": items, "positions": positions, "stats": stats, "calls": trainer.calls}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_dp_ranks_agree_on_rounds_and_split_the_surplus(tmp_path):
    mp.start_processes(_dp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in (0, 1))
    # Round 0: 2 + 0 effective of the 4 wanted; round 1: 2 + 1 more, room 2, cut evenly:
    # rank 1 (holding 0) takes its one, rank 0 (holding 2) one of its two.
    assert r0["calls"] == r1["calls"] == [0, 1]
    assert r0["items"] == ["r0g0", "r0g1", "r1g0"] and r1["items"] == ["r1g0"]
    assert r0["positions"] == [0, 2, 4] and r1["positions"] == [5]  # distinct over the ranks
    assert r0["stats"] == r1["stats"] == DynamicSamplingStats(rounds=2, drawn_groups=8, kept_groups=4, target=4)


def test_config_validation_and_tags():
    cfg = RunConfig()
    assert not cfg.grpo.dynamic_sampling and cfg.grpo.dynamic_sampling_max_rounds == 3
    cfg.grpo.dynamic_sampling = True
    with pytest.raises(ValueError, match=r"grpo.dynamic_sampling=true and the SSB top-up \(ssb.enabled=true"):
        cfg.validate()
    cfg.ssb.target_effective_ratio = 0.0
    cfg.validate()
    cfg.ssb.target_effective_ratio, cfg.ssb.enabled = 1.0, False
    cfg.validate()
    cfg.grpo.dynamic_sampling_max_rounds = 0
    with pytest.raises(ValueError, match="grpo.dynamic_sampling_max_rounds"):
        cfg.validate()
    from megatron_r1v.config import field_docs

    doc = {name: doc for name, _, doc in field_docs()}["grpo.dynamic_sampling"]
    assert "2503.14476" in doc and "ssb.enabled" in doc and "dynamic_sampling/kept_fraction" in doc
    assert stage_tags("grpo", dynamic_sampling=True)[:len(GRPO_TAGS) + 2] == GRPO_TAGS + DYNAMIC_SAMPLING_TAGS
