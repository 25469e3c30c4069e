"""The SSB over 2 DP ranks on gloo: sharded draw = single-process draw over the union,
re-sharding 2 -> 1 (and 2 -> 3), and a save killed halfway (worker docstring has the setup)."""

import json
import re

import zarr

from megatron_r1v.config import SSBConfig
from megatron_r1v.ssb import load, read_metadata, save

WORKER = "tests/distributed/workers/ssb_worker.py"


def test_sharded_draw_equals_union_draw_and_reshards(torchrun, tmp_path):
    torchrun(WORKER, 2, ["--mode", "draw", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "draw.json").read_text())

    # 15 groups, every fifth with zero advantage: 12 stored; k = 20 is clamped to 12.
    assert [len(d) for d in report["draws"]] == [1, 3, 5, 8, 12]
    assert report["draws"] == report["union_draws"]
    assert all(len(set(d)) == len(d) for d in report["draws"])  # without replacement
    assert {o for owners in report["owners"] for o in owners} == {0, 1}  # both ranks took part

    sharded, union = report["plan_stats"]
    assert sharded == union
    # B = 7 fresh groups, E = 2 effective, rho = 1: the 5 zero groups are replaced.
    assert {k: sharded[k] for k in ("fresh_groups", "fresh_effective", "reused_groups", "buffer_size", "aged_out")} \
        == {"fresh_groups": 7, "fresh_effective": 2, "reused_groups": 5, "buffer_size": 12, "aged_out": 0}
    (keep0, drop0, reused0), (keep1, drop1, reused1) = report["plans"]
    assert (keep0, drop0, keep1, drop1) == ([0, 3], [1, 2], [], [0, 1, 2])
    union_reused = report["union_plan_reused"]
    assert sorted(reused0 + reused1) == sorted(union_reused)
    for part in (reused0, reused1):  # each rank's share comes in the global draw order
        assert part == [u for u in union_reused if u in part]
    # Placed to even out the batches (rank 0 kept 2 fresh groups, rank 1 none): 7 groups, 4 + 3.
    assert sorted([len(keep0) + len(reused0), len(keep1) + len(reused1)]) == [3, 4]

    # Fewer groups to reuse than zero groups: the latest zero groups in the step's order go, the
    # same as in one process (positions 5 on rank 1, 4 on rank 0), not each rank's own choice.
    assert report["small_dropped"] == report["small_union_dropped"] == [4, 5]
    # Rank 0 holds both drawn groups and keeps 3 fresh groups after the drop, rank 1 two: the
    # first drawn group is sent to rank 1, the second stays (4 + 3).
    mine0, mine1 = report["small_reused"]
    assert len(mine0) == 1 and len(mine1) == 1 and sorted(mine0 + mine1) == report["small_union_reused"]

    # ssb.capacity over both ranks: the same 5 groups stay as in one process, 7 evicted in all.
    held0, held1 = report["capped_held"]
    assert sorted(held0 + held1) == report["capped_union"] and len(report["capped_union"]) == 5
    assert report["capped_evicted"] == [7, 7] and held0 and held1

    # The same capacity at load: the sharded load over the DP group keeps one process's 5 groups.
    capped = load(tmp_path / "store", 0, 1, SSBConfig(capacity=5, max_age=100, seed=7))
    assert report["loaded_capped"] == sorted(g.uid for g in capped.groups) and len(capped) == 5

    # DP 2 -> 1: rank 0 holds all groups, equal field by field to the single-process store.
    meta = read_metadata(tmp_path / "store")
    assert (meta.dp_size, meta.step, meta.draw_counter) == (2, 4, report["union_counter"])
    merged = load(tmp_path / "store", dp_rank=0, dp_size=1)
    reference = load(tmp_path / "union_store", dp_rank=0, dp_size=1)
    assert len(merged) == len(reference) == 12
    assert all(a.same_content(b) for a, b in zip(merged.groups, reference.groups))
    times = [merged.times_drawn(g.uid) for g in merged.groups]  # the draw history is state too
    assert times == [reference.times_drawn(g.uid) for g in reference.groups] and sum(times) == 1 + 3 + 5 + 8 + 12 + 5
    assert merged.draw_counter == reference.draw_counter
    next_draw = merged.draw(4).uids
    assert next_draw == report["next_draw"] == reference.draw(4).uids

    # Same DP size: each rank gets its own shard back; 2 -> 3: a partition of the groups.
    for rank in range(2):
        assert sorted(g.uid for g in load(tmp_path / "store", rank, 2).groups) == report["held"][rank]
    three = [sorted(g.uid for g in load(tmp_path / "store", rank, 3).groups) for rank in range(3)]
    assert sorted(u for part in three for u in part) == sorted(report["held"][0] + report["held"][1])
    assert three[1] == report["held"][1] and all(three)


def test_save_killed_halfway_leaves_previous_store(torchrun, tmp_path):
    proc = torchrun(WORKER, 2, ["--mode", "killed", "--out", str(tmp_path)], check=False)
    assert proc.returncode != 0
    assert re.search(r"exitcode\s*:\s*17", proc.stdout + proc.stderr), proc.stderr[-3000:]
    assert "supposed to be killed" not in proc.stderr

    store, partial = tmp_path / "store", tmp_path / ".store.partial"
    # The kill hit the middle of rank 1's shard: the partial directory proves it ran.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.partial", "before.json", "store"]
    half = zarr.open_group(str(partial / "rank_00001"), mode="r")
    assert sorted(half.array_keys()) == ["step", "times_drawn", "uid"]  # the first 3 of its 11 arrays
    assert not dict(half.attrs).get("complete")

    # The store under the final name is still the first save, whole.
    meta = read_metadata(store)
    assert (meta.step, meta.dp_size) == (1, 2)
    before = json.loads((tmp_path / "before.json").read_text())["uids"]
    assert sorted(g.uid for rank in range(2) for g in load(store, rank, 2).groups) == before
    assert sorted(g.uid for g in load(store, 0, 1).groups) == before

    # The next save commits over it and clears the stale partial directory.
    save(load(store, 0, 1), store, step=3)
    assert read_metadata(store).step == 3 and not partial.exists()
    assert sorted(g.uid for g in load(store, 0, 1).groups) == before
