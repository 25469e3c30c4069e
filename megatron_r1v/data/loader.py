"""Prompt batches for rollouts (:class:`PromptLoader`), preference-pair batches for MPO
(:class:`PairLoader`) and conversation batches for SFT (:class:`SFTLoader`): records -> tiles
-> chat-template token ids, with a cursor.

Each epoch visits the records in a permutation drawn from ``(seed, epoch)``; a step's
global batch is the next ``n`` positions (running into the next epoch's permutation when
one ends), and data-parallel rank r takes every dp_size-th of them starting at r. The
position in that order is the whole state (:class:`DataCursor`), saved with checkpoints,
so a resumed run sees exactly the prompts an uninterrupted run would.

A step's records are tiled together (:meth:`PromptLoader.prepare_many`: one ``tile_files``
call over all their images, so a DALI tiler fills its batches and a replica's ranks share
one broadcast per step, see :mod:`.replica_tiling`). A prompt whose images fail to tile, or
whose prompt does not fit ``max_seq_len``, is a bad sample: an error, or with
``on_bad_sample="skip"`` dropped from this step's batch, counted in the cursor and logged
with the reason, exactly as when each record is prepared alone (a batch with a bad image is
tiled again record by record, so the policy applies per record).

:attr:`PromptLoader.data_seconds` adds up the wall time spent preparing records (reading,
tiling, templating); trainers read it per step with :meth:`PromptLoader.take_data_seconds`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch

from .images import ImageError
from .schema import PreferenceRecord, PromptRecord, SFTRecord
from .template import ChatTemplate, EncodedSample, OverlengthError
from .tiling import Tiler, TilingResult

logger = logging.getLogger(__name__)

_Tiles = Union[tuple[Optional[torch.Tensor], tuple[int, ...]], ImageError]
"""A record's (pixels, tiles per image), or the ImageError that makes it a bad sample."""


@dataclass
class PromptItem:
    record: PromptRecord
    prompt_ids: torch.Tensor  # [P] int64
    pixel_values: Optional[torch.Tensor]
    """[tiles, 3, S, S] in image-token order, or None without images; [tiles, 0] (the count
    only, ``replica_tiling.layout_only``) on ranks that need no pixels (later pipeline stages)."""
    tiles_per_image: tuple[int, ...]


@dataclass
class DataCursor:
    """Where the loader is; everything needed to continue identically."""

    epoch: int = 0
    position: int = 0
    """Next index into this epoch's permutation (global, before DP sharding)."""
    skipped: int = 0
    """Bad samples dropped so far (all ranks' count is the sum)."""


class PromptLoader:
    def __init__(
        self,
        records: Sequence[PromptRecord],
        template: ChatTemplate,
        tiler: Tiler,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        on_bad_sample: Literal["error", "skip"] = "error",
    ):
        if not records:
            raise ValueError("PromptLoader needs at least one record")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample: {on_bad_sample!r} is not one of 'error', 'skip'")
        self.records = list(records)
        self.template, self.tiler, self.seed = template, tiler, seed
        self.dp_rank, self.dp_size, self.on_bad_sample = dp_rank, dp_size, on_bad_sample
        self.cursor = DataCursor()
        self._by_id = {r.id: r for r in self.records}
        self.data_seconds = 0.0
        """Wall seconds spent in :meth:`prepare_many` so far (see :meth:`take_data_seconds`)."""

    def take_data_seconds(self) -> float:
        """Seconds spent preparing records since the last call (a step's ``perf/data_time_s``)."""
        seconds, self.data_seconds = self.data_seconds, 0.0
        return seconds

    def record(self, prompt_id: str) -> PromptRecord:
        """The record with this id (e.g. for a group drawn from the Selective Sample Buffer)."""
        if prompt_id not in self._by_id:
            raise KeyError(f"prompt {prompt_id!r} is not in this run's data ({len(self.records)} records)")
        return self._by_id[prompt_id]

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def next_indices(self, n_prompts: int) -> list[int]:
        """Record indices of the next global batch of ``n_prompts``; advances the cursor."""
        if n_prompts < 1 or n_prompts % self.dp_size:
            raise ValueError(f"prompts per step ({n_prompts}) must be a positive multiple of dp_size ({self.dp_size})")
        out: list[int] = []
        while len(out) < n_prompts:
            order = self._permutation(self.cursor.epoch)
            take = order[self.cursor.position: self.cursor.position + n_prompts - len(out)]
            out += [int(i) for i in take]
            self.cursor.position += len(take)
            if self.cursor.position == len(order):
                self.cursor.epoch += 1
                self.cursor.position = 0
        return out

    def next_batch(self, n_prompts: int) -> list[PromptItem]:
        """This rank's share of the next ``n_prompts`` global prompts, prepared for rollout."""
        return [item for _, item in self.next_share(n_prompts)]

    def next_share(self, n_prompts: int) -> list[tuple[int, PromptItem]]:
        """:meth:`next_batch` with each item's position in the global batch (this rank holds
        positions ``dp_rank, dp_rank + dp_size, ...``; skipped records are left out). A batch
        saved with its positions can be shared out again at another DP size
        (``trainer/grpo_async.py``)."""
        mine = self.next_indices(n_prompts)[self.dp_rank::self.dp_size]
        prepared = self.prepare_many([self.records[i] for i in mine])
        positions = range(self.dp_rank, n_prompts, self.dp_size)
        return [(p, item) for p, item in zip(positions, prepared, strict=True) if item is not None]

    def prepare_many(self, records: Sequence) -> list:
        """``prepare`` of each record (None where skipped), all their images tiled in one call."""
        start = time.perf_counter()
        try:
            return self._prepare_many(records)
        finally:
            self.data_seconds += time.perf_counter() - start

    def _prepare_many(self, records: Sequence) -> list:
        paths = [path for record in records for path in record.images]
        tiled: Optional[TilingResult] = None
        if paths:
            try:
                tiled = self.tiler.tile_files(paths)
            except ImageError:  # on_bad_sample=error in the tiler: judge record by record, as alone
                return [self._prepare(record, self._tiles(record)) for record in records]
        out, offset = [], 0
        for record in records:
            n = len(record.images)
            part = TilingResult(tiled.images[offset:offset + n],
                                [s for s in tiled.skipped if offset <= s.index < offset + n]) if n else None
            out.append(self._prepare(record, self._join(part)))
            offset += n
        return out

    def _tiles(self, record) -> _Tiles:
        """The record's own tiling, :meth:`_join` ed (or the ImageError it raised)."""
        try:
            return self._join(self.tiler.tile_files(record.images) if record.images else None)
        except ImageError as err:
            return err

    @staticmethod
    def _join(tiled: Optional[TilingResult]) -> _Tiles:
        """(tiles of a record's images in order, tiles per image), or the ImageError of its first skipped image."""
        if tiled is not None and tiled.num_skipped:
            first = tiled.skipped[0]
            return ImageError(first.path, first.reason)
        images = tiled.kept() if tiled is not None else []
        if len(images) == 1:  # its tiles as they are: the packer copies them into its row anyway
            pixels = images[0].pixel_values
        else:
            pixels = torch.cat([img.pixel_values for img in images]) if images else None
        return pixels, tuple(img.num_tiles for img in images)

    def _skip(self, record, err: Exception) -> None:
        if self.on_bad_sample == "error":
            raise err
        self.cursor.skipped += 1
        kind = {PromptRecord: "prompt", SFTRecord: "conversation"}.get(type(record), "pair")
        logger.warning("skipping %s %s (on_bad_sample=skip; %d skipped so far): %s",
                       kind, record.id, self.cursor.skipped, err)

    def prepare(self, record: PromptRecord) -> Optional[PromptItem]:
        """The record tiled and templated; None when it is skipped as a bad sample."""
        return self.prepare_many([record])[0]

    def _prepare(self, record: PromptRecord, tiles: _Tiles) -> Optional[PromptItem]:
        """``tiles``: what :meth:`_join` gave for the record."""
        try:
            if isinstance(tiles, ImageError):
                raise tiles
            pixels, counts = tiles
            return PromptItem(record, self.template.prompt_ids(record.id, record.question, counts), pixels, counts)
        except (ImageError, OverlengthError) as err:
            return self._skip(record, err)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_records": len(self.records), **asdict(self.cursor)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["num_records"] != len(self.records):
            raise ValueError(f"data cursor was saved for seed {state['seed']} over {state['num_records']} records; "
                             f"this run has seed {self.seed} over {len(self.records)} records")
        self.cursor = DataCursor(state["epoch"], state["position"], state["skipped"])


@dataclass
class PairItem:
    record: PreferenceRecord
    chosen: EncodedSample
    rejected: EncodedSample
    pixel_values: Optional[torch.Tensor]
    """The prompt's tiles, as :attr:`PromptItem.pixel_values`; both sequences hold the same image tokens."""


class PairLoader(PromptLoader):
    """:class:`PromptLoader` over preference pairs: each item is the pair's two full
    conversations (prompt + chosen, prompt + rejected), labels on the responses only."""

    def _prepare(self, record: PreferenceRecord, tiles: _Tiles) -> Optional[PairItem]:
        try:
            if isinstance(tiles, ImageError):
                raise tiles
            pixels, counts = tiles
            chosen = self.template.encode(record.id, record.prompt, record.chosen, counts)
            rejected = self.template.encode(record.id, record.prompt, record.rejected, counts)
            return PairItem(record, chosen, rejected, pixels)
        except (ImageError, OverlengthError) as err:
            return self._skip(record, err)


@dataclass
class SFTItem:
    record: SFTRecord
    sample: EncodedSample
    """The whole conversation; labels on every assistant reply (``ChatTemplate.encode_conversation``)."""
    pixel_values: Optional[torch.Tensor]
    """The images of all its user turns, as :attr:`PromptItem.pixel_values`."""


class SFTLoader(PromptLoader):
    """:class:`PromptLoader` over SFT conversations (``data.schema.SFTRecord``)."""

    def _prepare(self, record: SFTRecord, tiles: _Tiles) -> Optional[SFTItem]:
        try:
            if isinstance(tiles, ImageError):
                raise tiles
            pixels, counts = tiles
            return SFTItem(record, self.template.encode_conversation(record.id, record.messages, counts), pixels)
        except (ImageError, OverlengthError) as err:
            return self._skip(record, err)
