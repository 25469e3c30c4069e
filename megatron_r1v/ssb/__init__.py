"""The Selective Sample Buffer (SSB) of Skywork R1V2 (arXiv 2504.16656, section 3.3).

GRPO groups whose responses all get the same reward have zero advantage and no policy
gradient; the SSB keeps groups with non-zero advantage and puts them back into later
batches, drawn by |A|, so that batches stay full of effective samples.

- :mod:`.buffer`: the store (``SSBGroup``, ``SelectiveSampleBuffer``): insertion filter,
  eviction, age-out, weighted draw without replacement, sharded over DP ranks.
- :mod:`.policy`: how many buffered groups a step reuses (``plan_batch``, ``TopUpStats``).
- :mod:`.persist`: zarr save / load with re-sharding to another DP size.

Per GRPO step (every DP rank, ``dp_group`` the data-parallel process group)::

    plan = plan_batch(buffer, [adv_G for each fresh group], step, dp_group)
    batch = [fresh[i] for i in plan.keep_fresh] + plan.reused
    ...  # old/ref log-probs, train; log plan.stats.metrics()
    buffer.insert(SSBGroup(...) for each fresh group)  # zero-advantage ones are skipped
    save(buffer, ckpt_dir / "ssb", step, dp_group)     # with every checkpoint
"""

from .buffer import Draw, InsertStats, SelectiveSampleBuffer, SSBGroup, check_ssb_config, group_priority
from .persist import FORMAT_VERSION, StoreMetadata, load, read_metadata, save
from .policy import BatchPlan, TopUpStats, balance_drops, plan_batch, reuse_count

__all__ = [
    "BatchPlan", "Draw", "FORMAT_VERSION", "InsertStats", "SSBGroup", "SelectiveSampleBuffer", "StoreMetadata",
    "TopUpStats", "balance_drops", "check_ssb_config", "group_priority", "load", "plan_batch", "read_metadata",
    "reuse_count", "save",
]
