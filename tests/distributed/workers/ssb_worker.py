"""torchrun worker: the Selective Sample Buffer sharded over the DP ranks (gloo).

Every rank builds the same groups from a fixed seed and keeps those with index = rank
(mod world), as if its own rollouts had produced them. Modes:

- ``draw``: sharded draws (and a ``plan_batch``) over the world against a single-process
  buffer holding the union (rank 0), then a save of both (``store``: sharded,
  ``union_store``: single process) and one more sharded draw. Rank 0 writes what it saw
  to ``<out>/draw.json``; the test compares and reloads the stores with other DP sizes.
- ``killed``: a save to ``<out>/store`` that succeeds, then a second save to the same
  path in which the last rank dies (``os._exit``) after writing part of its shard. Rank
  0 writes the first save's uids to ``<out>/before.json`` before the second save.

Any disagreement between ranks raises (non-zero exit).
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch.distributed as dist

from megatron_r1v.config import SSBConfig
from megatron_r1v.ssb import SelectiveSampleBuffer, SSBGroup, persist, plan_batch, save

N_GROUPS = 15
CONFIG = SSBConfig(capacity=64, max_age=100, seed=7)


def make_groups(n: int, seed: int, step0: int = 0) -> list[SSBGroup]:
    """Groups of 2-4 responses with ragged lengths; every fifth one has zero advantage."""
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n):
        g = int(rng.integers(2, 5))
        adv = np.zeros(g) if i % 5 == 4 else rng.normal(size=g) * rng.uniform(0.1, 2.0)
        resp = [int(rng.integers(1, 9)) for _ in range(g)]
        groups.append(SSBGroup(
            prompt_id=f"p{seed}-{i}", step=step0 + i % 4,
            token_ids=[rng.integers(0, 50000, size=6 + r) for r in resp],
            loss_mask=[rng.random(r) > 0.2 for r in resp],
            old_logprobs=[-rng.random(r) for r in resp],
            advantages=adv, rewards={"total": rng.normal(size=g), "rule": rng.integers(0, 2, size=g)},
            image_paths=(f"img/{i}.png",),
        ))
    return groups


def same_on_all_ranks(value, world: int) -> None:
    seen = [None] * world
    dist.all_gather_object(seen, value)
    if any(s != seen[0] for s in seen):
        raise AssertionError(f"ranks disagree: {seen}")


def gather_sorted(values: list, world: int, flat: bool = True) -> list:
    """Every rank's ``values``: merged and sorted, or (flat False) one sorted list per rank."""
    parts = [None] * world
    dist.all_gather_object(parts, sorted(values))
    return sorted(v for part in parts for v in part) if flat else parts


def run_draw(out: Path, rank: int, world: int) -> None:
    groups = make_groups(N_GROUPS, seed=3)
    mine = SelectiveSampleBuffer(CONFIG)
    mine.insert(g for i, g in enumerate(groups) if i % world == rank)
    union = SelectiveSampleBuffer(CONFIG)
    union.insert(reversed(make_groups(N_GROUPS, seed=3)))  # another order, another copy
    report = {"draws": [], "union_draws": [], "owners": []}
    for k in (1, 3, 5, 8, 20):  # 20 > the 12 stored groups: the draw is clamped
        drawn = mine.draw(k, dist.group.WORLD)
        same_on_all_ranks(drawn.uids, world)
        held = [g.uid for g in drawn.groups]
        if held != [u for u, o in zip(drawn.uids, drawn.owners) if o == rank]:
            raise AssertionError(f"rank {rank} returned {held}, the draw assigns it {drawn.uids}/{drawn.owners}")
        report["draws"].append(drawn.uids)
        report["owners"].append(drawn.owners)
        report["union_draws"].append(union.draw(k).uids)

    # Top-up: rank 0 has 2 effective + 2 zero fresh groups, rank 1 three zero ones.
    fresh = {0: [[1.0, -1.0], [0.0, 0.0], [0.0, 0.0], [0.5, -0.5]], 1: [[0.0, 0.0]] * 3}
    # Positions in the step's order: round-robin, as PromptLoader.next_share deals them.
    positions = {0: [0, 2, 4, 6], 1: [1, 3, 5]}
    union_positions = positions[0] + positions[1]
    # A buffer of 2 groups (both on rank 0) first: 2 of the 5 zero groups go, the latest ones
    # (positions 5 on rank 1 and 4 on rank 0), as in one process; rank 1 trains one of the 2.
    small = [g for g in make_groups(4, seed=5) if g.priority > 0][:2]
    small_mine = SelectiveSampleBuffer(CONFIG)
    small_mine.insert(small if rank == 0 else [])
    small_union = SelectiveSampleBuffer(CONFIG)
    small_union.insert(small)
    small_plan = plan_batch(small_mine, fresh[rank], 4, dist.group.WORLD, positions[rank])
    small_union_plan = plan_batch(small_union, fresh[0] + fresh[1], 4, positions=union_positions)
    report["small_dropped"] = gather_sorted([positions[rank][i] for i in small_plan.drop_fresh], world)
    report["small_union_dropped"] = sorted(union_positions[i] for i in small_union_plan.drop_fresh)
    report["small_reused"] = gather_sorted([g.uid for g in small_plan.reused], world, flat=False)
    report["small_union_reused"] = sorted(g.uid for g in small_union_plan.reused)

    plan = plan_batch(mine, fresh[rank], 4, dist.group.WORLD, positions[rank])
    union_plan = plan_batch(union, fresh[0] + fresh[1], step=4, positions=union_positions)
    same_on_all_ranks(plan.stats, world)
    report["plan_stats"] = [dataclasses.asdict(plan.stats), dataclasses.asdict(union_plan.stats)]
    plans = [None] * world
    dist.all_gather_object(plans, (plan.keep_fresh, plan.drop_fresh, [g.uid for g in plan.reused]))
    report["plans"] = plans
    report["union_plan_reused"] = [g.uid for g in union_plan.reused]

    # Capacity over the DP ranks: 5 groups kept of 12 effective ones, rank 0 holding 8 of them;
    # the sharded eviction keeps the union's 5 (a per-rank cap would keep up to 10).
    capped = SSBConfig(capacity=5, max_age=100, seed=7)
    many = make_groups(15, seed=11)
    cap_mine = SelectiveSampleBuffer(capped)
    evicted = cap_mine.insert([g for i, g in enumerate(many) if (i % 3 != 0) == (rank == 0)], dist.group.WORLD)
    cap_union = SelectiveSampleBuffer(capped)
    union_evicted = cap_union.insert(many).evicted
    report["capped_held"] = gather_sorted([g.uid for g in cap_mine.groups], world, flat=False)
    report["capped_union"] = sorted(g.uid for g in cap_union.groups)
    report["capped_evicted"] = [sum(gather_sorted([evicted.evicted], world)), union_evicted]

    save(mine, out / "store", step=4, group=dist.group.WORLD)
    held = [None] * world
    dist.all_gather_object(held, sorted(g.uid for g in mine.groups))
    report["held"] = held
    # Resumed with a smaller capacity over the DP group: both shares together keep 5 groups.
    loaded = persist.load(out / "store", rank, world, capped, dist.group.WORLD)
    report["loaded_capped"] = gather_sorted([g.uid for g in loaded.groups], world)
    report["next_draw"] = mine.draw(4, dist.group.WORLD).uids
    if rank == 0:
        save(union, out / "union_store", step=4)  # group None: a single-process store
        report["union_counter"] = union.draw_counter
        (out / "draw.json").write_text(json.dumps(report))


def run_killed(out: Path, rank: int, world: int) -> None:
    mine = SelectiveSampleBuffer(CONFIG)
    mine.insert(g for i, g in enumerate(make_groups(N_GROUPS, seed=5)) if i % world == rank)
    save(mine, out / "store", step=1, group=dist.group.WORLD)
    before = [None] * world
    dist.all_gather_object(before, sorted(g.uid for g in mine.groups))
    if rank == 0:
        (out / "before.json").write_text(json.dumps({"uids": sorted(u for b in before for u in b)}))
    mine.insert(g for i, g in enumerate(make_groups(N_GROUPS, seed=6, step0=2)) if i % world == rank)
    mine.draw(3, dist.group.WORLD)
    if rank == world - 1:
        real_write, written = persist._write_array, []

        def dying_write(grp, name, data):
            real_write(grp, name, data)
            written.append(name)
            if len(written) == 3:  # killed in the middle of its shard
                os._exit(17)

        persist._write_array = dying_write
    save(mine, out / "store", step=2, group=dist.group.WORLD)
    raise AssertionError("the second save was supposed to be killed")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("draw", "killed"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    (run_draw if args.mode == "draw" else run_killed)(args.out, rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
