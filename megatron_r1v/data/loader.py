"""Prompt batches for rollouts (:class:`PromptLoader`) and preference-pair batches for MPO
(:class:`PairLoader`): records -> tiles -> chat-template token ids, with a cursor.

Each epoch visits the records in a permutation drawn from ``(seed, epoch)``; a step's
global batch is the next ``n`` positions (running into the next epoch's permutation when
one ends), and data-parallel rank r takes every dp_size-th of them starting at r. The
position in that order is the whole state (:class:`DataCursor`), saved with checkpoints,
so a resumed run sees exactly the prompts an uninterrupted run would.

A prompt whose images fail to tile, or whose prompt does not fit ``max_seq_len``, is a
bad sample: an error, or with ``on_bad_sample="skip"`` dropped from this step's batch,
counted in the cursor and logged with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from .images import ImageError
from .schema import PreferenceRecord, PromptRecord
from .template import ChatTemplate, EncodedSample, OverlengthError
from .tiling import Tiler

logger = logging.getLogger(__name__)


@dataclass
class PromptItem:
    record: PromptRecord
    prompt_ids: torch.Tensor  # [P] int64
    pixel_values: Optional[torch.Tensor]  # [tiles, 3, S, S] in image-token order, or None
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
        mine = self.next_indices(n_prompts)[self.dp_rank::self.dp_size]
        items = []
        for index in mine:
            item = self.prepare(self.records[index])
            if item is not None:
                items.append(item)
        return items

    def _tiles(self, record) -> tuple[Optional[torch.Tensor], tuple[int, ...]]:
        """(tiles of all the record's images in order, tiles per image); raises ImageError."""
        tiled = self.tiler.tile_files(record.images) if record.images else None
        if tiled is not None and tiled.num_skipped:
            first = tiled.skipped[0]
            raise ImageError(first.path, first.reason)
        images = tiled.kept() if tiled is not None else []
        pixels = torch.cat([img.pixel_values for img in images]) if images else None
        return pixels, tuple(img.num_tiles for img in images)

    def _skip(self, record, err: Exception) -> None:
        if self.on_bad_sample == "error":
            raise err
        self.cursor.skipped += 1
        kind = "prompt" if isinstance(record, PromptRecord) else "pair"
        logger.warning("skipping %s %s (on_bad_sample=skip; %d skipped so far): %s",
                       kind, record.id, self.cursor.skipped, err)

    def prepare(self, record: PromptRecord) -> Optional[PromptItem]:
        try:
            pixels, tiles = self._tiles(record)
            return PromptItem(record, self.template.prompt_ids(record.id, record.question, tiles), pixels, tiles)
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
    pixel_values: Optional[torch.Tensor]  # the prompt's tiles; both sequences hold the same image tokens


class PairLoader(PromptLoader):
    """:class:`PromptLoader` over preference pairs: each item is the pair's two full
    conversations (prompt + chosen, prompt + rejected), labels on the responses only."""

    def prepare(self, record: PreferenceRecord) -> Optional[PairItem]:
        try:
            pixels, tiles = self._tiles(record)
            chosen = self.template.encode(record.id, record.prompt, record.chosen, tiles)
            rejected = self.template.encode(record.id, record.prompt, record.rejected, tiles)
            return PairItem(record, chosen, rejected, pixels)
        except (ImageError, OverlengthError) as err:
            return self._skip(record, err)
