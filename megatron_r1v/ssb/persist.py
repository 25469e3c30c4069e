"""Saving and loading the Selective Sample Buffer as a zarr store, with re-sharding.

The SSB (Skywork R1V2, arXiv 2504.16656, section 3.3) is training state: a resumed run
must draw the same groups as an uninterrupted one, so it is saved with every checkpoint.

Layout (zarr format 2 on disk, which zarr 2.x and 3.x both read and write)::

    <path>/                .zattrs: format, format_version, dp_size, seed, draw_counter,
                           step, config (the SSBConfig it was saved with); origin (a
                           StoreOrigin) in stores written by the offline prompt-pool filter
      rank_00000/          one zarr group per DP rank; .zattrs: complete, n_groups,
                           prompt_ids, image_paths, reward_keys
        uid, step, times_drawn, n_samples   int64 [N]      per group
        checksum                            int64 [N]      buffer.group_checksum: every array of the group
        advantages                          float32 [S]    per response (S = sum n_samples)
        rewards                             float64 [S, K] NaN where a group lacks key k
        token_offsets, response_offsets     int64 [S + 1]  into the two ragged arrays below
        token_ids                           int32 [T]      prompt + response, concatenated
        loss_mask                           bool [R]       response tokens, concatenated
        old_logprobs                        float32 [R]
      rank_00001/ ...

Saving is atomic (``atomic_dir``): rank 0 creates ``.<name>.partial`` beside ``<path>``,
every rank writes its own ``rank_XXXXX`` group (marking it complete last), a barrier,
rank 0 checks that all groups are complete and commits the directory to ``<path>`` (a
previous store is deleted only after the new one is in place), a barrier. A save killed
at any point before the commit leaves ``<path>`` as it was (absent, or the previous
store), and the next save removes the stale ``.partial`` directory.

Loading checks each group against its stored ``uid`` and ``checksum`` and names the shard,
group and prompt of the first that does not match (a damaged or missing chunk). Version-1
stores, written before the checksum existed, load with the uid check only.

An initial store (``ssb.initial_store``, written by ``python -m megatron_r1v.ssb.prompt_pool
--ssb-store``) is read by :func:`load_initial`: its ``origin`` says what the groups were
generated with (tokenizer, chat template, group size, temperature, ...), and a run that
differs is refused, naming the store and the field; its groups must have step 0.

Loading onto a different number of DP ranks re-shards while reading as few shards as
possible: with fewer ranks, saved shard s goes whole to rank s % dp_size (2 -> 1: rank 0
takes everything); with more, the ranks r = s (mod saved size) split shard s round-robin
in uid order (1 -> 2: alternate groups). The capacity is then enforced over the DP group
(the same groups go at any sharding). Draws do not depend on where groups live (see
:mod:`.buffer`), so the next draw is unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch.distributed as dist
import zarr

from megatron_r1v.atomic_dir import commit_directory, partial_directory, partial_path
from megatron_r1v.config import SSBConfig, from_dict
from megatron_r1v.platform import first_failure

from .buffer import SelectiveSampleBuffer, SSBGroup, collective_device, group_checksum, group_rank_size

FORMAT = "megatron_r1v.ssb"
FORMAT_VERSION = 2  # 2: per-group checksum
READABLE_VERSIONS = (1, 2)
_ZARR3 = int(zarr.__version__.split(".")[0]) >= 3
_CHUNK = 1 << 22  # elements per chunk of the ragged arrays (16 MiB of int32)


@dataclass(frozen=True)
class StoreMetadata:
    dp_size: int
    seed: int
    draw_counter: int
    step: int
    config: dict[str, Any]
    format_version: int = FORMAT_VERSION
    origin: Optional[dict[str, Any]] = None
    """A :class:`StoreOrigin` as a dict in stores written by the prompt-pool filter, else None."""


@dataclass(frozen=True)
class StoreOrigin:
    """What an initial store's groups were generated with: a run starting from the store must
    match every field, or its prompts' tokens, group sizes and old log-probs would not be the
    ones it would have produced itself (a mismatch would train on wrong tokens or ratios)."""

    tokenizer: str
    """:func:`tokenizer_fingerprint` of the tokenizer (token ids mean the same tokens)."""
    vocab_size: int
    chat_template: str
    """``ChatFormat.source``: the prompt's and the reply's markers."""
    tokens_per_tile: int
    """Image tokens per tile (the model's): part of the prompt tokens."""
    max_tiles: int
    """``data.max_tiles``: how many tiles, so image tokens, a prompt's images get."""
    n_samples: int
    """Responses per group (``rollout.n_samples``: GRPO's G)."""
    temperature: float
    """``rollout.temperature``: the stored old log-probs are log softmax(logits / temperature)."""

    @classmethod
    def of(cls, template: Any, max_tiles: int, n_samples: int, temperature: float) -> "StoreOrigin":
        """The origin of groups prompted with ``template`` (a ``data.template.ChatTemplate``)."""
        tokenizer = template.tokenizer
        return cls(tokenizer_fingerprint(tokenizer), len(tokenizer), template.format.source,
                   int(template.config.tokens_per_tile), int(max_tiles), int(n_samples), float(temperature))


ORIGIN_KEYS = {"tokenizer": "data.tokenizer", "vocab_size": "data.tokenizer", "chat_template": "data.chat_template",
               "tokens_per_tile": "the model's tokens per tile", "max_tiles": "data.max_tiles",
               "n_samples": "rollout.n_samples", "temperature": "rollout.temperature"}
"""The run setting behind each ``StoreOrigin`` field (named in a mismatch error)."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """blake2b of the tokenizer's token -> id map (added tokens included): equal exactly when
    every id means the same token, whatever folder the tokenizer was loaded from."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.blake2b(json.dumps(vocab, ensure_ascii=False).encode("utf-8"), digest_size=16).hexdigest()


def shard_name(rank: int) -> str:
    return f"rank_{rank:05d}"


def _open_group(path: Path, mode: str) -> Any:
    if _ZARR3 and mode == "w":
        return zarr.open_group(str(path), mode=mode, zarr_format=2)
    return zarr.open_group(str(path), mode=mode)


def _write_array(grp: Any, name: str, data: np.ndarray) -> None:
    chunks = tuple(max(1, min(n, _CHUNK)) for n in data.shape)
    if _ZARR3:
        grp.create_array(name, data=data, chunks=chunks)
    else:
        grp.create_dataset(name, data=data, chunks=chunks)


def _metadata_file(path: Path) -> Path:
    for name in (".zattrs", "zarr.json"):
        if (path / name).exists():
            return path / name
    return path / ".zattrs"


def save(buffer: SelectiveSampleBuffer, path: str | Path, step: int,
         group: Optional[dist.ProcessGroup] = None, origin: Optional[StoreOrigin] = None) -> None:
    """Writes every DP rank's buffer to the store ``path`` (collective over ``group``);
    ``origin``: what its groups were generated with (an initial store's, :func:`load_initial`)."""
    path = Path(path)
    rank, world = group_rank_size(group)
    partial = partial_path(path)
    if rank == 0:
        partial_directory(path)  # fresh: a killed save may have left one
        root = _open_group(partial, "w")
        root.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "dp_size": world, "seed": buffer.seed,
            "draw_counter": buffer.draw_counter, "step": int(step), "config": dataclasses.asdict(buffer.config),
        })
        if origin is not None:
            root.attrs["origin"] = dataclasses.asdict(origin)
    _barrier(group)
    failure = None
    try:
        _write_shard(_open_group(partial / shard_name(rank), "w"), buffer)
    except Exception as err:  # any: every rank must hear of it, not wait in the barrier
        failure = f"rank {rank}: {type(err).__name__}: {err}"
    _agree(failure, partial, path, group)
    if rank == 0:
        for r in range(world):
            shard = partial / shard_name(r)
            if not dict(_open_group(shard, "r").attrs).get("complete"):
                raise RuntimeError(f"SSB save: {shard} is incomplete; {path} was left unchanged")
        commit_directory(partial, path)
    _barrier(group)


def _agree(failure: Optional[str], partial: Path, path: Path, group: Optional[dist.ProcessGroup]) -> None:
    """Raises RuntimeError on every rank of ``group`` when any rank's shard failed to write
    (its message first); ``path`` is left as it was. Doubles as the barrier after the writes:
    ``first_failure``'s all-reduce waits for every rank."""
    # group None is one process here (group_rank_size), not the default world group.
    alone = group_rank_size(group)[1] == 1
    first = failure if alone else first_failure(failure, collective_device(group), group)
    if first is not None:
        raise RuntimeError(f"SSB save into {partial} failed ({first}); {path} was left unchanged")


def _barrier(group: Optional[dist.ProcessGroup]) -> None:
    if group_rank_size(group)[1] > 1:
        dist.barrier(group=group)


def _write_shard(grp: Any, buffer: SelectiveSampleBuffer) -> None:
    groups = buffer.groups
    responses = [(g, i) for g in groups for i in range(g.n_samples)]
    reward_keys = sorted({k for g in groups for k in g.rewards})
    rewards = np.full((len(responses), len(reward_keys)), np.nan, dtype=np.float64)
    for row, (g, i) in enumerate(responses):
        for col, key in enumerate(reward_keys):
            if key in g.rewards:
                rewards[row, col] = g.rewards[key][i]

    def offsets(lengths: list[int]) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)

    def cat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0,), dtype=dtype)

    arrays = {
        "uid": np.array([g.uid for g in groups], dtype=np.int64),
        "step": np.array([g.step for g in groups], dtype=np.int64),
        "times_drawn": np.array([buffer.times_drawn(g.uid) for g in groups], dtype=np.int64),
        "n_samples": np.array([g.n_samples for g in groups], dtype=np.int64),
        "checksum": np.array([group_checksum(g, buffer.times_drawn(g.uid)) for g in groups], dtype=np.int64),
        "advantages": cat([g.advantages for g in groups], np.float32),
        "rewards": rewards,
        "token_offsets": offsets([g.token_ids[i].size for g, i in responses]),
        "response_offsets": offsets([g.loss_mask[i].size for g, i in responses]),
        "token_ids": cat([g.token_ids[i] for g, i in responses], np.int32),
        "loss_mask": cat([g.loss_mask[i] for g, i in responses], np.bool_),
        "old_logprobs": cat([g.old_logprobs[i] for g, i in responses], np.float32),
    }
    for name, data in arrays.items():
        _write_array(grp, name, data)
    # Written last: a shard without it was interrupted.
    grp.attrs.update({
        "n_groups": len(groups), "prompt_ids": [g.prompt_id for g in groups],
        "image_paths": [list(g.image_paths) for g in groups], "reward_keys": reward_keys, "complete": True,
    })


def read_metadata(path: str | Path) -> StoreMetadata:
    """The store's root metadata; ValueError naming the file if it is not an SSB store of this version."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"SSB store {path} does not exist")
    meta_file = _metadata_file(path)
    try:
        attrs = dict(_open_group(path, "r").attrs)
    except Exception as err:  # zarr raises several types for a missing or broken group
        raise ValueError(f"{meta_file}: not a readable zarr group ({type(err).__name__}: {err})") from None
    if attrs.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: not an SSB store (format {attrs.get('format')!r}, expected {FORMAT!r})")
    if attrs.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{meta_file}: SSB store format version {attrs.get('format_version')!r}, "
                         f"this code reads versions {READABLE_VERSIONS}")
    return StoreMetadata(dp_size=int(attrs["dp_size"]), seed=int(attrs["seed"]),
                         draw_counter=int(attrs["draw_counter"]), step=int(attrs["step"]),
                         config=dict(attrs["config"]), format_version=int(attrs["format_version"]),
                         origin=dict(attrs["origin"]) if attrs.get("origin") is not None else None)


def load(path: str | Path, dp_rank: int = 0, dp_size: int = 1,
         config: Optional[SSBConfig] = None, group: Optional[dist.ProcessGroup] = None) -> SelectiveSampleBuffer:
    """This DP rank's buffer from the store ``path`` saved with any DP size.

    ``config`` is the current run's (its capacity applies, over the ranks of ``group``, the DP
    group: collective; None: this rank's share alone); None uses the saved one.
    The random state (seed, draw counter) always comes from the store.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    path = Path(path)
    meta = read_metadata(path)
    if config is None:
        config = from_dict(SSBConfig, meta.config, "ssb")
    saved = meta.dp_size
    if dp_size <= saved:
        sources = [(s, 0, 1) for s in range(dp_rank, saved, dp_size)]
    else:  # ranks dp_rank, dp_rank +- saved, ... share shard dp_rank % saved
        shard = dp_rank % saved
        sources = [(shard, dp_rank // saved, len(range(shard, dp_size, saved)))]
    buffer = SelectiveSampleBuffer(config, seed=meta.seed, draw_counter=meta.draw_counter)
    for shard, part, parts in sources:
        groups = _read_shard(path / shard_name(shard))
        groups.sort(key=lambda pair: pair[0].uid)
        buffer.restore(groups[part::parts])
    evicted = buffer.evict_to(config.capacity, group)
    if evicted:  # a smaller ssb.capacity, or a store saved when the capacity counted per rank
        print(f"SSB store {path}: DP rank {dp_rank} evicted {evicted} of its groups over ssb.capacity="
              f"{config.capacity} (counted over all DP ranks)", flush=True)
    return buffer


def load_initial(path: str | Path, dp_rank: int, dp_size: int, config: SSBConfig,
                 expected: StoreOrigin, group: Optional[dist.ProcessGroup] = None) -> list[SSBGroup]:
    """This DP rank's groups of the initial store ``path`` (``ssb.initial_store``), split as
    :func:`load` splits a store over more ranks and capped at ``config.capacity`` over ``group``.

    ValueError naming the store and the field when the store does not fit the run: no
    ``origin`` (not written by the prompt-pool filter, e.g. a checkpoint's buffer), a
    format version before per-group checksums, an origin field other than ``expected``'s,
    a group of another size or not of step 0. Damage is caught by :func:`load`'s checks.
    """
    path = Path(path)
    where = f"ssb.initial_store {path}"
    meta = read_metadata(path)
    if meta.format_version < 2:
        raise ValueError(f"{where}: field format_version is {meta.format_version}, too old for an initial store "
                         "(needs >= 2, with per-group checksums); write it again with the prompt-pool filter")
    if meta.origin is None:
        raise ValueError(f"{where}: field origin is missing: not written by `python -m megatron_r1v.ssb.prompt_pool "
                         "--ssb-store` (a checkpoint's buffer is training state: resume from its checkpoint)")
    for name, want in dataclasses.asdict(expected).items():
        if meta.origin.get(name) != want:
            raise ValueError(f"{where}: field origin.{name} is {meta.origin.get(name)!r}, this run has {want!r} "
                             f"({ORIGIN_KEYS[name]})")
    groups = load(path, dp_rank, dp_size, config, group).groups
    for grp in groups:
        if grp.step != 0 or grp.n_samples != expected.n_samples:
            field, value = ("step", grp.step) if grp.step != 0 else ("n_samples", grp.n_samples)
            raise ValueError(f"{where}: group of prompt {grp.prompt_id!r}: field {field} is {value}, an initial "
                             f"store's groups have step 0 and n_samples {expected.n_samples}")
    return groups


def _read_shard(shard: Path) -> list[tuple[SSBGroup, int]]:
    """(group, times drawn) pairs of one saved rank, each checked against its uid and checksum."""
    if not shard.is_dir():
        raise ValueError(f"SSB store {shard.parent}: shard {shard.name} is missing")
    grp = _open_group(shard, "r")
    attrs = dict(grp.attrs)
    if not attrs.get("complete"):
        raise ValueError(f"{_metadata_file(shard)}: shard was not completely written")
    names = ["uid", "step", "times_drawn", "n_samples", "advantages", "rewards", "token_offsets",
             "response_offsets", "token_ids", "loss_mask", "old_logprobs"]
    if "checksum" in grp:  # absent in version-1 stores
        names.append("checksum")
    a = {}
    for name in names:
        try:
            a[name] = np.asarray(grp[name][...])
        except Exception as err:  # zarr / numcodecs raise several types for damaged chunks
            raise ValueError(f"{shard / name}: cannot be read ({type(err).__name__}: {err}); the SSB store is "
                             "damaged") from None
    keys = list(attrs["reward_keys"])
    groups, first = [], 0
    for g in range(int(attrs["n_groups"])):
        rows = range(first, first + int(a["n_samples"][g]))
        first = rows.stop
        grp_ = _group_from_arrays(a, attrs, keys, g, rows)
        times_drawn = int(a["times_drawn"][g])
        damaged = grp_.uid != int(a["uid"][g]) or (
            "checksum" in a and group_checksum(grp_, times_drawn) != int(a["checksum"][g]))
        if damaged:
            raise ValueError(f"{shard}: group {g} (prompt {grp_.prompt_id!r}) does not match its stored "
                             "uid / checksum; the SSB store is damaged (a lost or altered chunk)")
        groups.append((grp_, times_drawn))
    return groups


def _group_from_arrays(a: dict[str, np.ndarray], attrs: dict, keys: list[str], g: int, rows: range) -> SSBGroup:
    tok, resp = a["token_offsets"], a["response_offsets"]
    rewards = {k: a["rewards"][rows.start:rows.stop, c] for c, k in enumerate(keys)}
    return SSBGroup(
        prompt_id=attrs["prompt_ids"][g], step=int(a["step"][g]),
        token_ids=[a["token_ids"][tok[i]:tok[i + 1]] for i in rows],
        loss_mask=[a["loss_mask"][resp[i]:resp[i + 1]] for i in rows],
        old_logprobs=[a["old_logprobs"][resp[i]:resp[i + 1]] for i in rows],
        advantages=a["advantages"][rows.start:rows.stop],
        rewards={k: v for k, v in rewards.items() if not np.isnan(v).any()},
        image_paths=tuple(attrs["image_paths"][g]),
    )
