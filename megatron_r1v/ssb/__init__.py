"""The Selective Sample Buffer (SSB) of Skywork R1V2 (arXiv 2504.16656, section 3.3).

GRPO groups whose responses all get the same reward have zero advantage and no policy
gradient; the SSB keeps groups with non-zero advantage and puts them back into later
batches, drawn by |A|, so that batches stay full of effective samples. "Effective" is one
criterion throughout (``losses.grpo.effective_groups``): rewards not all equal and their
std >= ``ssb.min_reward_std`` (:func:`resolve_min_reward_std` resolves ``auto``); Eq. 6
zeroes the advantages of the other groups, so nearly-flat groups under a continuous
reward-model score are neither trained on with std-amplified noise nor buffered.

- :mod:`.buffer`: the store (``SSBGroup``, ``SelectiveSampleBuffer``): insertion filter,
  eviction, age-out, weighted draw without replacement, sharded over DP ranks.
- :mod:`.policy`: how many buffered groups a step reuses (``plan_batch``, ``TopUpStats``)
  and the criterion's threshold (``resolve_min_reward_std``).
- :mod:`.persist`: zarr save / load with re-sharding to another DP size, and the initial
  store a fresh run starts from (``ssb.initial_store``, :func:`load_initial`).
- :mod:`.prompt_pool`: the offline prompt filter (same criterion), which writes that store.

Per GRPO step (every DP rank, ``dp_group`` the data-parallel process group)::

    min_std = resolve_min_reward_std(cfg.ssb, cfg.reward, cfg.rollout.n_samples)  # once
    adv_G = group_advantages(rewards_1G, min_std=min_std)[0]          # per fresh group (Eq. 6)
    plan = plan_batch(buffer, [adv_G for each fresh group], step, dp_group, positions)  # in the step's order
    batch = [fresh[i] for i in plan.keep_fresh] + plan.reused
    ...  # old/ref log-probs, train; log plan.stats.metrics()
    buffer.insert((SSBGroup(...) for each fresh group), dp_group)  # ineffective ones skipped; capacity over DP
    save(buffer, ckpt_dir / "ssb", step, dp_group)     # with every checkpoint
"""

from .buffer import (
    Draw,
    InsertStats,
    SelectiveSampleBuffer,
    SSBGroup,
    check_ssb_config,
    group_is_effective,
    group_priority,
)
from .persist import FORMAT_VERSION, StoreMetadata, StoreOrigin, load, load_initial, read_metadata, save
from .policy import (
    BatchPlan,
    TopUpStats,
    latest_positions,
    place_reused,
    plan_batch,
    resolve_min_reward_std,
    reuse_count,
)

__all__ = [
    "BatchPlan", "Draw", "FORMAT_VERSION", "InsertStats", "SSBGroup", "SelectiveSampleBuffer", "StoreMetadata",
    "StoreOrigin", "TopUpStats", "check_ssb_config", "group_is_effective", "group_priority", "latest_positions", "load",
    "load_initial", "place_reused", "plan_batch", "read_metadata", "resolve_min_reward_std", "reuse_count", "save",
]
