"""Reference log-probs of MPO's chosen and rejected responses, computed once and cached.

MPO's implicit reward r(y) = beta log(pi(y|x) / pi_ref(y|x)) (Eq. 3-4) needs the
reference policy's summed log-prob of every chosen and rejected response. The reference
is the initial policy, so these numbers never change during a run: they are computed
once, before the first step, by a forward-only pass over all pairs (data-parallel ranks
take every dp-th pair, each replica runs Megatron's schedule, then everything is
gathered), and stored as

    <cache dir>/reference_logprobs-<key>.npz     ids, chosen, rejected (float64)
    <cache dir>/reference_logprobs-<key>.json    what the key was made of (for people), and
                                                 the .npz file's size and SHA-256

``key`` is a hash of everything that changes the numbers: the data file's bytes and the
size and mtime of each image, the initial checkpoint (every file's name, size and mtime;
hashing tens of GB of weights would cost minutes), the model, tokenizer, template and
tiling settings, the parallel layout of a random initialization. A changed input gives
a new key: the old file is stale, is removed, and the numbers are recomputed. A resumed
run finds the file of its key, so it never recomputes with trained weights; if the cache
was deleted, the build recomputes it before the training checkpoint is loaded, with the
initial weights. A cache file that fails its hash or cannot be read is reported by name
and recomputed the same way (the weights are still the initial policy's at that point).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_r1v.atomic_dir import atomic_file, write_text_atomic
from megatron_r1v.checkpoint.manifest import hash_file
from megatron_r1v.config import RunConfig
from megatron_r1v.data.loader import PairLoader
from megatron_r1v.data.packing import pack_pairs
from megatron_r1v.models.r1v.context_parallel import packing_multiple
from megatron_r1v.data.schema import PreferenceRecord
from megatron_r1v.platform import ParallelContext
from megatron_r1v.trainer.mpo_step import sequence_sums
from megatron_r1v.trainer.schedule import compute_logprobs, packed_batch

PREFIX = "reference_logprobs-"
# The tokenizer may live in a checkpoint folder: hash its files, not the weights next to them.
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template")
ReferenceLogprobs = dict[str, tuple[float, float]]
"""pair id -> (log pi_ref(chosen | x), log pi_ref(rejected | x)), summed over response tokens."""


def _file_digest(path: Path) -> str:
    return hash_file(path)["sha256"]


def _stat(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _tree_stats(root: Path) -> list:
    return [[str(p.relative_to(root)), *_stat(p)[1:]] for p in sorted(root.rglob("*")) if p.is_file()]


def cache_inputs(cfg: RunConfig, ctx: ParallelContext, records: Sequence[PreferenceRecord],
                 init_layout: Optional[dict] = None) -> dict:
    """Everything the reference log-probs depend on, as plain data (hashed into the key).
    ``init_layout``: the TP/PP of the run that drew the random initial weights (a resumed run
    at another layout; default this run's)."""
    images = sorted({p for r in records for p in r.images})
    tokenizer = Path(cfg.data.tokenizer)
    checkpoint: object
    if cfg.model.checkpoint:
        checkpoint = {"path": str(Path(cfg.model.checkpoint).resolve()), "files": _tree_stats(Path(cfg.model.checkpoint))}
    else:  # random weights depend on the seed and on how they were split over ranks
        layout = init_layout or {"tp": ctx.tp, "pp": ctx.pp}
        checkpoint = {"random_init_seed": cfg.train.seed, "tp": layout["tp"], "pp": layout["pp"]}
    return {
        "data": {"path": str(Path(cfg.data.train_path).resolve()), "sha256": _file_digest(Path(cfg.data.train_path)),
                 "images": [_stat(p) for p in images], "format": cfg.mpo.data_format,
                 "margin_threshold": cfg.mpo.margin_threshold, "max_pairs_per_prompt": cfg.mpo.max_pairs_per_prompt},
        "pairs": [r.id for r in records],
        "checkpoint": checkpoint,
        "model": {"preset": cfg.model.preset, "params_dtype": cfg.model.params_dtype, "backend": cfg.model.backend},
        "tokenizer": {p.name: _file_digest(p) for p in sorted(tokenizer.iterdir())
                      if p.is_file() and p.name.startswith(_TOKENIZER_FILES)},
        "template": {"seq_length": cfg.train.seq_length, "max_tiles": cfg.data.max_tiles,
                     "on_bad_sample": cfg.data.on_bad_sample, "chat_template": cfg.data.chat_template},
    }


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


class DamagedCache(ValueError):
    """The cache file of this run's key exists but cannot be trusted (message: file and cause)."""


def load_cached(cache_dir: Path, key: str, pair_ids: Sequence[str]) -> Optional[ReferenceLogprobs]:
    """The cached values of ``key``; None when there is no file; :class:`DamagedCache` when
    the file does not match the hash its sidecar recorded, cannot be read, or lacks pairs."""
    path = cache_dir / f"{PREFIX}{key}.npz"
    if not path.is_file():
        return None
    sidecar = cache_dir / f"{PREFIX}{key}.json"
    try:
        recorded = json.loads(sidecar.read_text()).get("npz") if sidecar.is_file() else None
        if recorded is not None and (path.stat().st_size != recorded["size"]
                                     or _file_digest(path) != recorded["sha256"]):
            raise DamagedCache(f"{path}: size or SHA-256 differs from what {sidecar.name} recorded")
        with np.load(path, allow_pickle=False) as data:
            values = {str(i): (float(c), float(r)) for i, c, r in zip(data["ids"], data["chosen"], data["rejected"])}
    except DamagedCache:
        raise
    except Exception as err:  # zipfile, numpy and json raise several types for damaged files
        raise DamagedCache(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    missing = [i for i in pair_ids if i not in values]
    if missing:
        raise DamagedCache(f"{path}: lacks {len(missing)} of the run's {len(pair_ids)} pairs (e.g. {missing[0]!r})")
    return values


def write_cache(cache_dir: Path, key: str, inputs: dict, values: ReferenceLogprobs) -> Path:
    """Writes the cache atomically, its sidecar (with the file's size and SHA-256) after it,
    and removes files of other (stale) keys."""
    final = cache_dir / f"{PREFIX}{key}.npz"
    ids = sorted(values)
    with atomic_file(final, "wb") as handle:
        np.savez(handle, ids=np.array(ids, dtype=str), chosen=np.array([values[i][0] for i in ids], dtype=np.float64),
                 rejected=np.array([values[i][1] for i in ids], dtype=np.float64))
    described = {k: v for k, v in inputs.items() if k != "pairs"}
    described["npz"] = {"size": final.stat().st_size, "sha256": _file_digest(final)}
    write_text_atomic(cache_dir / f"{PREFIX}{key}.json", json.dumps(described, indent=1))
    for stale in cache_dir.glob(f"{PREFIX}*"):
        if not stale.name.startswith(f"{PREFIX}{key}."):
            stale.unlink()
    return final


def _chunks(indices: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def compute_reference_logprobs(model, loader: PairLoader, ctx: ParallelContext, token_budget: int,
                               chunk_pairs: int = 64, seq_multiple: int = 1) -> ReferenceLogprobs:
    """Summed log-probs of every pair's chosen and rejected response under ``model`` as it
    is now (collective over all ranks; every rank gets the whole dict). Pairs that are
    bad samples (on_bad_sample=skip) are left out, as the loader leaves them out later.
    ``seq_multiple``: context parallelism's per-sample padding (``data.packing``)."""
    mine = list(range(ctx.dp_rank, len(loader.records), ctx.dp))
    skipped_before = loader.cursor.skipped  # training counts its own skips
    local: ReferenceLogprobs = {}
    done = 0
    for chunk in _chunks(mine, chunk_pairs):
        items = [it for it in (loader.prepare(loader.records[i]) for i in chunk) if it is not None]
        if items:
            packed = pack_pairs(items, token_budget, pipeline=ctx.pp > 1, seq_multiple=seq_multiple)
            logprobs = compute_logprobs(model, [packed_batch(mb) for mb in packed], ctx)
            if ctx.is_last_stage:
                for mb, (lp, _) in zip(packed, logprobs):
                    sums = sequence_sums(lp.double(), mb.cu_seqlens).tolist()
                    by_id = dict(zip(mb.sample_indices, sums))
                    for k in range(len(items)):
                        if 2 * k in by_id:
                            local[items[k].record.id] = (by_id[2 * k], by_id[2 * k + 1])
        done += len(chunk)
        if ctx.rank == 0:
            print(f"reference log-probs: {min(done * ctx.dp, len(loader.records))}/{len(loader.records)} pairs",
                  flush=True)
    loader.cursor.skipped = skipped_before
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, local if ctx.is_last_stage and ctx.tp_rank == 0 else {})
    out: ReferenceLogprobs = {}
    for part in gathered:
        out.update(part)
    return out


def reference_logprobs(cfg: RunConfig, ctx: ParallelContext, model, loader: PairLoader,
                       init_layout: Optional[dict] = None) -> ReferenceLogprobs:
    """The cached values for this run's inputs, or freshly computed (and cached) ones.
    Call before any optimizer step: the model's weights must be the initial policy's.
    ``init_layout``: see :func:`cache_inputs` (a run resumed at another TP/PP)."""
    cache_dir = cfg.mpo.reference_cache or (str(Path(cfg.train.save_dir) / "reference_logprobs")
                                            if cfg.train.save_dir else None)
    inputs = cache_inputs(cfg, ctx, loader.records, init_layout) if cache_dir else None
    key = cache_key(inputs) if inputs else None
    if cache_dir:
        try:
            cached = load_cached(Path(cache_dir), key, [r.id for r in loader.records])
        except DamagedCache as err:  # recomputing is safe: the weights are still the initial policy's
            cached = None
            if ctx.rank == 0:
                print(f"warning: reference log-probs: {err}; recomputing them", flush=True)
        if cached is not None:
            if ctx.rank == 0:
                print(f"reference log-probs: {len(cached)} pairs from {cache_dir} (key {key})", flush=True)
            return cached
        if ctx.rank == 0 and any(Path(cache_dir).glob(f"{PREFIX}*.npz")):
            print(f"reference log-probs: the cache in {cache_dir} is stale (data, checkpoint or settings "
                  "changed); recomputing", flush=True)
    drawn_at = {k: (init_layout or {}).get(k, v) for k, v in (("tp", ctx.tp), ("pp", ctx.pp))}
    if not cfg.model.checkpoint and drawn_at != {"tp": ctx.tp, "pp": ctx.pp}:
        # Megatron's random initialization depends on how the weights are split: the
        # initial policy of a run started at another TP/PP cannot be drawn again here.
        raise ValueError(f"reference log-probs: no cache for this run in {cache_dir}, and its random initial "
                         f"weights were drawn at tp={drawn_at['tp']} pp={drawn_at['pp']} (this run: tp={ctx.tp} "
                         f"pp={ctx.pp}); resume at that layout once (it rebuilds the cache), or start from a "
                         "model.checkpoint")
    with torch.no_grad():
        seq_multiple = packing_multiple(ctx.cp, ctx.tp, cfg.parallel.sequence_parallel)
        values = compute_reference_logprobs(model, loader, ctx, cfg.mpo.micro_batch_tokens, seq_multiple=seq_multiple)
    if cache_dir:
        if ctx.rank == 0:
            write_cache(Path(cache_dir), key, inputs, values)
        dist.barrier()
    return values
