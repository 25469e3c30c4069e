"""The Selective Sample Buffer in one process: store rules, draw statistics, top-up policy,
and the zarr store (round trip, re-shard 1 -> 2, interrupted save, format errors)."""

import itertools
import math

import numpy as np
import pytest
import zarr

from megatron_r1v.config import SSBConfig
from megatron_r1v.ssb import (
    SelectiveSampleBuffer,
    SSBGroup,
    latest_positions,
    place_reused,
    load,
    persist,
    plan_batch,
    read_metadata,
    reuse_count,
    save,
)


def make_group(prompt_id: str, step: int, advantages, seed: int = 0, rewards=None, images=("a.png",)) -> SSBGroup:
    rng = np.random.default_rng(seed)
    g = len(advantages)
    lengths = rng.integers(1, 7, size=g)
    return SSBGroup(
        prompt_id=prompt_id, step=step,
        token_ids=[rng.integers(0, 150_000, size=5 + n) for n in lengths],
        loss_mask=[rng.random(n) > 0.3 for n in lengths],
        old_logprobs=[-rng.random(n) * 3 for n in lengths],
        advantages=advantages,
        rewards={"total": rng.normal(size=g)} if rewards is None else rewards,
        image_paths=images,
    )


def buffer_with(groups, **config) -> SelectiveSampleBuffer:
    buf = SelectiveSampleBuffer(SSBConfig(**config))
    buf.insert(groups)
    return buf


def prompts(buf: SelectiveSampleBuffer) -> set[str]:
    return {g.prompt_id for g in buf.groups}


# --- the store -------------------------------------------------------------------------


def test_group_types_priority_and_errors():
    grp = make_group("p", 3, [1.0, -0.5, 0.0, -0.5], rewards={"total": [1, 0, 0, 0], "rule": [1.0, 0, 0, 0]})
    assert grp.priority == pytest.approx(0.5, abs=0)  # mean |A| = 2 / 4, exact in binary
    assert grp.n_samples == 4 and grp.token_ids[0].dtype == np.int32 and grp.loss_mask[0].dtype == np.bool_
    assert grp.old_logprobs[0].dtype == np.float32 and grp.rewards["total"].dtype == np.float64
    assert make_group("p", 3, [1.0, -0.5, 0.0, -0.5]).uid == grp.uid  # content hash, rewards aside
    assert make_group("p", 4, [1.0, -0.5, 0.0, -0.5]).uid != grp.uid
    with pytest.raises(ValueError, match=r"prompt 'q' \(step 1\): advantages must be 2 finite values"):
        make_group("q", 1, [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"prompt 'q'.*reward 'rule' must be 2 finite values"):
        make_group("q", 1, [1.0, -1.0], rewards={"rule": [1.0]})
    with pytest.raises(ValueError, match=r"response 0: token ids must be in \[0, 2\^31\)"):
        SSBGroup("q", 0, [np.array([-1, 2])], [np.ones(1, bool)], [np.zeros(1)], [1.0])
    with pytest.raises(ValueError, match=r"response 0: loss_mask \(3,\) and old_logprobs \(2,\)"):
        SSBGroup("q", 0, [np.arange(5)], [np.ones(3, bool)], [np.zeros(2)], [1.0])


def test_insert_keeps_only_nonzero_advantage_and_skips_duplicates():
    buf = SelectiveSampleBuffer(SSBConfig())
    stats = buf.insert([make_group("a", 0, [1.0, -1.0]), make_group("zero", 0, [0.0, 0.0]),
                        make_group("b", 0, [0.3, -0.3], seed=1)])
    assert (stats.inserted, stats.zero_advantage, stats.duplicates, stats.evicted) == (2, 1, 0, 0)
    stats = buf.insert([make_group("a", 0, [1.0, -1.0])])  # same content as the stored "a"
    assert (stats.inserted, stats.duplicates, len(buf)) == (0, 1, 2)
    assert prompts(buf) == {"a", "b"} and buf.total_weight() == pytest.approx(1.3, rel=1e-7)


def test_eviction_lowest_priority_then_oldest():
    buf = SelectiveSampleBuffer(SSBConfig(capacity=3))
    buf.insert([make_group("a", 1, [0.5, -0.5]), make_group("b", 2, [0.5, -0.5]),
                make_group("c", 0, [1.0, -1.0]), make_group("d", 3, [0.2, -0.2])])
    assert prompts(buf) == {"a", "b", "c"}  # d has the lowest priority
    assert buf.insert([make_group("e", 4, [0.5, -0.5])]).evicted == 1
    assert prompts(buf) == {"b", "c", "e"}  # a, b, e tie at 0.5: a is the oldest
    buf.insert([make_group("f", 5, [0.1, -0.1])])
    assert prompts(buf) == {"b", "c", "e"}  # a newcomer below everything is the one evicted


def test_age_out_drops_groups_older_than_max_age():
    buf = buffer_with([make_group(f"s{s}", s, [1.0, -1.0], seed=s) for s in range(4)], max_age=2)
    assert buf.age_out(4) == 2  # 4 - 0 and 4 - 1 exceed 2; 4 - 2 does not
    assert prompts(buf) == {"s2", "s3"}
    assert buf.age_out(4) == 0


def test_draw_is_without_replacement_deterministic_and_order_independent():
    groups = [make_group(f"p{i}", i % 3, [0.1 * (i + 1), -0.1 * (i + 1)], seed=i) for i in range(9)]
    one, two = buffer_with(groups), buffer_with(reversed(groups))
    for k in (1, 4, 9, 30):
        a, b = one.draw(k), two.draw(k)
        assert a.uids == b.uids and len(a.uids) == min(k, 9) and len(set(a.uids)) == len(a.uids)
        assert [g.uid for g in a.groups] == a.uids and a.owners == [0] * len(a.uids)
    times = [one.times_drawn(g.uid) for g in one.groups]
    assert one.draw_counter == 4 and sum(times) == 1 + 4 + 9 + 9
    assert min(times) >= 2 and times == [two.times_drawn(g.uid) for g in two.groups]  # k = 9, 30 take all
    other_seed = SelectiveSampleBuffer(SSBConfig(seed=1))
    other_seed.insert(groups)
    assert [other_seed.draw(3).uids for _ in range(5)] != [buffer_with(groups).draw(3).uids for _ in range(5)]


def test_max_reuse_removes_groups_after_that_many_draws():
    buf = buffer_with([make_group(f"p{i}", 0, [1.0, -1.0], seed=i) for i in range(5)], max_reuse=2)
    first = buf.draw(3).uids
    assert len(buf) == 5
    second = buf.draw(5).uids
    assert len(buf) == 5 - len(first) and set(g.uid for g in buf.groups) == set(second) - set(first)


def test_draw_frequencies_match_priority_weights():
    """Ordered pairs of k = 2 draws from 4 groups, priorities w = 0.5, 1, 1.5, 2 (W = 5).

    Sequential weighted sampling without replacement gives P(i, j) = w_i/W * w_j/(W - w_i).
    Over n = 20,000 draws (fixed seed), the chi-square statistic of the 12 ordered-pair
    counts (11 degrees of freedom) must stay under 31.26, its 99.9% quantile; per group,
    first-draw and inclusion frequencies must be within 4.5 binomial standard deviations
    of the exact probabilities. The same counts fail against plausible wrong samplers
    (uniform; both slots ~ w independently, duplicates rejected), so the test has power.
    """
    w = np.array([0.5, 1.0, 1.5, 2.0])
    total, n = w.sum(), 20_000
    buf = buffer_with([make_group(f"g{i}", 0, [wi, -wi], seed=i) for i, wi in enumerate(w)], seed=2024)
    index = {g.uid: int(g.prompt_id[1:]) for g in buf.groups}
    counts = np.zeros((4, 4))
    for _ in range(n):
        i, j = (index[u] for u in buf.draw(2).uids)
        counts[i, j] += 1
    pairs = [(i, j) for i, j in itertools.permutations(range(4), 2)]
    observed = np.array([counts[p] for p in pairs])
    exact = np.array([w[i] / total * w[j] / (total - w[i]) for i, j in pairs])
    assert exact.sum() == pytest.approx(1.0) and observed.sum() == n

    def chi2(p: np.ndarray) -> float:
        return float(((observed - n * p) ** 2 / (n * p)).sum())

    assert chi2(exact) < 31.26
    assert chi2(np.full(12, 1 / 12)) > 1000
    independent = np.array([w[i] * w[j] for i, j in pairs])
    assert chi2(independent / independent.sum()) > 60

    first = counts.sum(axis=1) / n
    inclusion = (counts.sum(axis=1) + counts.sum(axis=0)) / n
    p_first = w / total
    p_incl = p_first + np.array([sum(w[j] / total * w[i] / (total - w[j]) for j in range(4) if j != i)
                                 for i in range(4)])
    for freq, p in ((first, p_first), (inclusion, p_incl)):
        assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / n)), (freq, p)


# --- the top-up policy -----------------------------------------------------------------


def test_reuse_count_by_hand():
    assert reuse_count(fresh=8, effective=3, buffered=10, target_ratio=0.75) == 3  # ceil(6) - 3
    assert reuse_count(fresh=8, effective=3, buffered=1, target_ratio=0.75) == 1  # the buffer runs short
    assert reuse_count(fresh=8, effective=3, buffered=10, target_ratio=1.0) == 5  # every zero group
    assert reuse_count(fresh=8, effective=7, buffered=10, target_ratio=0.5) == 0  # already above target
    assert reuse_count(fresh=10, effective=5, buffered=10, target_ratio=0.7) == 2  # 0.7 * 10 is 7, not 8
    assert reuse_count(fresh=0, effective=0, buffered=10, target_ratio=1.0) == 0


def test_place_reused_evens_out_batches_and_prefers_the_holder():
    # Rank 1 kept fewer fresh groups: the first drawn groups go there, then they alternate;
    # at a tie the holder keeps its group (nothing moves).
    assert place_reused([4, 1], owners=[0, 0, 0, 0, 0]) == [1, 1, 1, 0, 1]
    assert place_reused([2, 2], owners=[1, 0, 1]) == [1, 0, 1]
    assert place_reused([3, 3, 3], owners=[2, 2, 2]) == [2, 0, 1]  # the holder first, then the lowest rank
    assert place_reused([5], owners=[0, 0]) == [0, 0]


def test_latest_positions_single_process():
    # The latest zero groups in the step's order go, wherever they sit in this rank's list.
    assert latest_positions(2, [7, 3, 9, 1], None) == {7, 9}
    assert latest_positions(0, [7, 3], None) == set()
    with pytest.raises(ValueError, match="cannot drop 3 ineffective groups, only 2"):
        latest_positions(3, [7, 3], None)
    with pytest.raises(ValueError, match="share positions"):
        latest_positions(2, [4, 4], None)


def test_plan_batch_drops_by_position_not_by_index():
    """The same fresh groups listed in another order with their positions drop the same groups."""
    fresh = [[1.0, -1.0, 0.0] if i in (0, 3, 6) else [0.0, 0.0, 0.0] for i in range(8)]
    buffered = [make_group(f"old{i}", 1, [1.0, -1.0, 0.5], seed=i) for i in range(3)]
    order = [5, 2, 7, 0, 4, 1, 6, 3]  # position of each listed group
    plan = plan_batch(buffer_with(buffered, target_effective_ratio=0.75), [fresh[p] for p in order], step=2,
                      positions=order)
    assert sorted(order[i] for i in plan.drop_fresh) == [4, 5, 7]  # the latest three zero groups
    with pytest.raises(ValueError, match="8 fresh groups but 2 positions"):
        plan_batch(buffer_with(buffered), fresh, step=2, positions=[0, 1])


def test_plan_batch_numbers_by_hand():
    buffered = [make_group(f"old{i}", 1, [1.0, -1.0, 0.5], seed=i) for i in range(4)]
    buffered.append(make_group("ancient", 0, [2.0, -2.0, 1.0], seed=9))
    buf = buffer_with(buffered, max_age=2, target_effective_ratio=0.75)
    # 8 fresh groups, 3 with non-zero advantage (indices 0, 3, 6).
    fresh = [[1.0, -1.0, 0.0] if i in (0, 3, 6) else [0.0, 0.0, 0.0] for i in range(8)]
    plan = plan_batch(buf, fresh, step=3)
    s = plan.stats
    assert (s.fresh_groups, s.fresh_effective, s.reused_groups, s.reused_samples, s.buffer_size, s.aged_out) \
        == (8, 3, 3, 9, 4, 1)  # "ancient" (3 - 0 > 2) ages out; ceil(0.75 * 8) - 3 = 3 reused
    assert plan.drop_fresh == [4, 5, 7] and plan.keep_fresh == [0, 1, 2, 3, 6]
    assert len(plan.reused) == 3 and {g.prompt_id for g in plan.reused} <= {f"old{i}" for i in range(4)}
    assert s.metrics() == {"ssb/effective_ratio_fresh": 0.375, "ssb/effective_ratio_batch": 0.75,
                           "ssb/size": 4.0, "ssb/reused_groups": 3.0, "ssb/reused_samples": 9.0, "ssb/aged_out": 1.0}
    # Only one group left to reuse at a high target: the ratio falls short of it.
    small = buffer_with([make_group("only", 2, [1.0, -1.0])], target_effective_ratio=1.0)
    assert plan_batch(small, fresh, step=3).stats.effective_ratio_batch == 0.5  # (3 + 1) / 8


# --- the zarr store --------------------------------------------------------------------


def varied_buffer() -> SelectiveSampleBuffer:
    groups = [
        make_group("geo-1", 0, [1.5, -0.5, -1.0], seed=1, rewards={"total": [2, 0, 0.5], "rule": [1, 0, 0]}),
        make_group("geo-2 ünïcode", 1, [0.7, -0.7], seed=2, rewards={"total": [1, 0]}, images=()),
        make_group("chart/3", 2, [0.25, 0.25, -0.25, -0.25], seed=3, rewards={},
                   images=("charts/3 a.png", "charts/3 b.jpg")),
        make_group("zero", 2, [0.0, 0.0], seed=4),
        make_group("math-5", 3, [2.0, -2.0], seed=5),
    ]
    buf = buffer_with(groups, capacity=16, max_age=5, seed=11)
    buf.draw(2)  # times_drawn and the draw counter are state too
    return buf


def test_round_trip_is_exact_and_the_next_draw_is_unchanged(tmp_path):
    buf = varied_buffer()
    save(buf, tmp_path / "ssb", step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ssb"]  # no temporary directory left
    shard = zarr.open_group(str(tmp_path / "ssb" / "rank_00000"), mode="r")
    assert shard["token_ids"].dtype == np.int32 and shard["rewards"].shape == (11, 2)  # 3 + 2 + 4 + 2 responses

    meta = read_metadata(tmp_path / "ssb")
    assert (meta.dp_size, meta.seed, meta.draw_counter, meta.step) == (1, 11, 1, 3)
    loaded = load(tmp_path / "ssb")
    assert loaded.config == buf.config and (loaded.seed, loaded.draw_counter) == (11, 1)
    assert [g.uid for g in loaded.groups] == [g.uid for g in buf.groups] and len(loaded) == 4
    for a, b in zip(buf.groups, loaded.groups):
        assert a.same_content(b), a.prompt_id
    times = [loaded.times_drawn(g.uid) for g in loaded.groups]
    assert times == [buf.times_drawn(g.uid) for g in buf.groups] and sum(times) == 2
    assert [loaded.draw(3).uids for _ in range(3)] == [buf.draw(3).uids for _ in range(3)]


def test_empty_buffer_round_trip(tmp_path):
    save(SelectiveSampleBuffer(SSBConfig(seed=3)), tmp_path / "ssb", step=0)
    loaded = load(tmp_path / "ssb")
    assert len(loaded) == 0 and loaded.seed == 3 and loaded.draw(2).uids == []


def test_reshard_1_to_2_and_capacity_on_load(tmp_path):
    buf = varied_buffer()
    save(buf, tmp_path / "ssb", step=3)
    halves = [load(tmp_path / "ssb", dp_rank=r, dp_size=2) for r in range(2)]
    by_uid = {g.uid: g for g in buf.groups}
    assert [len(h) for h in halves] == [2, 2]
    assert sorted(g.uid for h in halves for g in h.groups) == sorted(by_uid)  # a partition
    assert [g.uid for g in halves[0].groups] == sorted(by_uid)[0::2]  # round-robin in uid order
    assert all(g.same_content(by_uid[g.uid]) for h in halves for g in h.groups)
    assert all(h.times_drawn(g.uid) == buf.times_drawn(g.uid) for h in halves for g in h.groups)
    small = load(tmp_path / "ssb", config=SSBConfig(capacity=2))
    assert prompts(small) == {"math-5", "geo-1"}  # priorities 2.0 and 1.0 beat 0.7 and 0.25


def test_interrupted_save_keeps_previous_store(tmp_path, monkeypatch):
    buf = varied_buffer()
    save(buf, tmp_path / "ssb", step=3)
    before = [g.uid for g in buf.groups]
    buf.insert([make_group("later", 4, [3.0, -3.0], seed=8)])
    real, written = persist._write_array, []

    def failing_write(grp, name, data):
        real(grp, name, data)
        written.append(name)
        if len(written) == 4:
            raise RuntimeError("injected failure")

    monkeypatch.setattr(persist, "_write_array", failing_write)
    with pytest.raises(RuntimeError, match="injected failure"):
        save(buf, tmp_path / "ssb", step=4)
    assert len(written) == 4  # it failed halfway through the shard
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ssb.partial", "ssb"]
    assert read_metadata(tmp_path / "ssb").step == 3
    assert [g.uid for g in load(tmp_path / "ssb").groups] == before
    written.clear()
    with pytest.raises(RuntimeError, match="injected failure"):  # a fresh path stays absent
        save(buf, tmp_path / "new", step=4)
    assert not (tmp_path / "new").exists()

    monkeypatch.setattr(persist, "_write_array", real)
    save(buf, tmp_path / "ssb", step=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new.partial", "ssb"]
    assert read_metadata(tmp_path / "ssb").step == 4 and "later" in prompts(load(tmp_path / "ssb"))


def test_store_errors_name_the_file(tmp_path):
    save(varied_buffer(), tmp_path / "ssb", step=3)
    root = zarr.open_group(str(tmp_path / "ssb"), mode="r+")
    root.attrs["format_version"] = 99
    with pytest.raises(ValueError,
                       match=r"ssb/\.zattrs: SSB store format version 99, this code reads versions \(1, 2\)"):
        load(tmp_path / "ssb")
    root.attrs.update({"format_version": 2, "dp_size": 2})
    with pytest.raises(ValueError, match=r"shard rank_00001 is missing"):
        load(tmp_path / "ssb", dp_rank=0, dp_size=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain/\.zattrs: not"):
        load(tmp_path / "plain")


@pytest.mark.parametrize("array", ["old_logprobs", "loss_mask", "rewards", "times_drawn", "token_ids", "advantages"])
def test_damaged_array_is_named_not_trained_on(tmp_path, array):
    """A deleted chunk reads back as zeros (zarr's fill value) and an altered one as other
    values: either way the per-group checksum must catch it, whichever array it hit."""
    buf = varied_buffer()
    save(buf, tmp_path / "ssb", step=3)
    shard = tmp_path / "ssb" / "rank_00000"
    chunks = [p for p in (shard / array).iterdir() if not p.name.startswith(".")]
    assert chunks, f"{array} has no chunk files"
    for chunk in chunks:
        chunk.unlink()  # the lost chunk of the repro
    with pytest.raises(ValueError, match=r"rank_00000: group \d+ \(prompt .*\) does not match its stored uid / "
                                         r"checksum; the SSB store is damaged"):
        load(tmp_path / "ssb")


def test_truncated_chunk_names_the_array(tmp_path):
    save(varied_buffer(), tmp_path / "ssb", step=3)
    chunk = next(p for p in (tmp_path / "ssb" / "rank_00000" / "old_logprobs").iterdir() if p.name[0] != ".")
    chunk.write_bytes(chunk.read_bytes()[:7])
    with pytest.raises(ValueError, match=r"rank_00000/old_logprobs: cannot be read .*the SSB store is damaged"):
        load(tmp_path / "ssb")


def test_version_1_store_loads_without_checksum(tmp_path):
    import shutil

    buf = varied_buffer()
    save(buf, tmp_path / "ssb", step=3)
    root = zarr.open_group(str(tmp_path / "ssb"), mode="r+")
    root.attrs["format_version"] = 1
    shutil.rmtree(tmp_path / "ssb" / "rank_00000" / "checksum")  # what version 1 wrote
    assert [g.uid for g in load(tmp_path / "ssb").groups] == [g.uid for g in buf.groups]


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match=r"ssb\.capacity must be >= 1"):
        SelectiveSampleBuffer(SSBConfig(capacity=0))
    with pytest.raises(ValueError, match=r"ssb\.target_effective_ratio must be in \[0, 1\]"):
        SelectiveSampleBuffer(SSBConfig(target_effective_ratio=1.5))
    assert math.isclose(SSBConfig().target_effective_ratio, 1.0)
    with pytest.raises(ValueError, match=r"ssb\.min_reward_std must be 'auto' or a finite number >= 0"):
        SelectiveSampleBuffer(SSBConfig(min_reward_std=-1.0))
    assert SSBConfig().min_reward_std == "auto"  # tests/unit/test_ssb_effective.py covers the criterion
