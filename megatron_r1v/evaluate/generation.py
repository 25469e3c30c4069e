"""Loading a checkpoint for generation and preparing its prompts, shared by the evaluator
(``evaluate.runner``) and the data tools (``tools/rejection_sample.py``,
``tools/generate_preferences.py``, through ``rollout.sampling_runs``).

Each prompt is prepared exactly as the GRPO trainer prepares it: images tiled by the tiler
``--tiler`` selects (``data.tilers.build_tiler``: DALI or the PIL reference, identical tiles;
a file or bytes embedded in a benchmark file), the chat template of ``data.template`` with the
tokenizer's turn markers (``--chat-template`` as ``data.chat_template``). A response ends at the
template's reply-closing token (``<|im_end|>`` for QwQ, ``<｜end▁of▁sentence｜>`` for R1-Distill)
or after the token budget.

:func:`score_text` scores a response with the rule and format terms of the training reward
(``rewards.hybrid.HybridReward``, no reward model): what the data tools keep or pair on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class SampleScore:
    """How one response scores against its prompt record."""

    extracted: Optional[str]
    """The final ``\\boxed{}`` content after ``</think>``; None when there is none."""
    correct: bool
    """r_rule == 1."""
    format_ok: bool
    """r_format == 1."""


def score_text(record: Any, text: str, think_opened_by_prompt: bool = True) -> SampleScore:
    """Scores one decoded response (special tokens kept) for a ``PromptRecord`` with the rule
    and format terms of the training reward (``rewards.hybrid.HybridReward``, no reward model)."""
    from megatron_r1v.config import RewardConfig
    from megatron_r1v.rewards.hybrid import HybridReward

    reward = HybridReward.from_config(RewardConfig(model_weight=0.0), think_opened_by_prompt=think_opened_by_prompt)
    (terms,) = reward.score_batch([record], [text])
    return SampleScore(terms.parsed_answer, terms.rule == 1.0, terms.format == 1.0)


@dataclass
class Generator:
    """A loaded checkpoint with what turns records into its requests: loaded once, used for
    every benchmark of a suite (:func:`load_generator`)."""

    engine: Any
    arch: Any
    """The checkpoint's ``R1VArch`` (positions, image token, tokens per tile)."""
    template: Any
    """``data.template.ChatTemplate`` of the tokenizer (or ``--chat-template``)."""
    tiler: Any
    tiler_description: str
    """Which tiler runs (``data.tilers.SelectedTiler.description``)."""

    @property
    def max_positions(self) -> int:
        return int(self.arch.decoder.max_position_embeddings)

    def check_items(self, records: Sequence[Any], max_problems: int = 20) -> None:
        """Every record's images decode and its prompt fits the positions with room for a
        response: ValueError listing the first ``max_problems`` problems (``FILE:LINE: item
        ID: why``), so a bad item stops the run before generation, not hours into it."""
        from megatron_r1v.data.images import ImageError, load_rgb
        from megatron_r1v.data.template import OverlengthError
        from megatron_r1v.data.tiling import choose_grid, num_tiles_for

        cfg, problems = self.tiler.config, []
        for record in records:
            try:
                sizes = [load_rgb(source, cfg.max_pixels).size for source in record.images]
                tiles = [num_tiles_for(choose_grid(width, height, cfg), cfg) for width, height in sizes]
                self.template.prompt_ids(record.id, record.question, tiles)
            except (ImageError, OverlengthError) as err:
                problems.append(f"{getattr(record, 'source', record.id)}: item {record.id}: {err}")
        if problems:
            more = f"\n... and {len(problems) - max_problems} more" if len(problems) > max_problems else ""
            raise ValueError(f"{len(problems)} item(s) cannot be run:\n" + "\n".join(problems[:max_problems]) + more)

    def setup(self, records: Sequence[Any], seed: int) -> "GenerationSetup":
        """The records (prompt records or ``evaluate.items.EvalItem``: anything with ``id``,
        ``images`` and ``question``) ready to generate for, in file order."""
        from megatron_r1v.data.loader import PromptLoader

        # Only prepare_many() is used (no shuffling): generation visits the records in file order.
        loader = PromptLoader(list(records), self.template, self.tiler, seed=seed)
        return GenerationSetup(list(records), self.engine, loader, (self.template.stop_token_id,),
                               self.template.open_think, self.tiler_description, self.max_positions)


@dataclass
class GenerationSetup:
    """What the evaluator and the data tools generate with: the records, the engine and how
    prompts are built."""

    records: list
    engine: Any
    loader: Any
    stop_ids: tuple[int, ...]
    think_opened: bool
    tiler: str
    """Which tiler runs (``data.tilers.SelectedTiler.description``)."""
    max_positions: int
    """The model's positions: prompt plus response must fit them."""


def check_generation_arguments(model_dir: PathLike, batch_size: int, limit: Optional[int], temperature: float,
                               max_new_tokens: int, tiler: str, tiler_threads: int, top_p: float = 1.0) -> None:
    """Raises ValueError / FileNotFoundError naming the flag for a bad argument, before anything slow."""
    from megatron_r1v.rollout.engine import SamplingParams
    from megatron_r1v.validation import TILERS

    if tiler not in TILERS:
        raise ValueError(f"--tiler must be one of {', '.join(TILERS)}, got {tiler!r}")
    if tiler_threads < 1:
        raise ValueError(f"--tiler-threads must be >= 1, got {tiler_threads}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    # SamplingParams checks temperature, top_p and max_new_tokens before anything slow runs.
    SamplingParams(n=1, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder {model_dir} does not exist")


def load_generator(model_dir: PathLike, tokenizer_dir: Optional[PathLike], max_tiles: int, device: str,
                   tiler_data: Any, reserve_new_tokens: int,
                   load_engine: Optional[Callable[..., tuple]] = None) -> Generator:
    """Loads the checkpoint, its tokenizer's template and the tiler. ``reserve_new_tokens``:
    positions kept free for the response, so a longer prompt is an OverlengthError naming it.
    ``tiler_data``: a ``DataConfig`` holding the ``--tiler`` / ``--tiler-threads`` /
    ``--chat-template`` choices. ``load_engine``: ``load_hf_engine`` (the default) or a
    function with its signature and result for another rollout engine."""
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tilers import build_tiler
    from megatron_r1v.data.tiling import TilingConfig
    from megatron_r1v.rollout.hf_engine import load_hf_engine

    engine, arch, tokenizer = (load_engine or load_hf_engine)(model_dir, tokenizer_dir, device)
    max_prompt = arch.decoder.max_position_embeddings - reserve_new_tokens
    if max_prompt < 1:
        raise ValueError(f"--max-new-tokens {reserve_new_tokens} leaves no room for a prompt in the model's "
                         f"{arch.decoder.max_position_embeddings} positions")
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=arch.tokens_per_tile, max_seq_len=max_prompt,
                                                      chat_template=tiler_data.chat_template))
    # The ids are the tokenizer's (the template reads them there); a checkpoint whose config
    # records another <IMG_CONTEXT> id cannot be run with it.
    if template.image_token_id != arch.image_token_id:
        raise ValueError(f"tokenizer {tokenizer_dir or model_dir}: <IMG_CONTEXT> has id {template.image_token_id}, "
                         f"but {os.path.join(model_dir, 'config.json')} records image token id {arch.image_token_id}")
    tiler, description = build_tiler(tiler_data, TilingConfig(image_size=arch.vision.image_size,
                                                               max_tiles=max_tiles), key="--tiler")
    return Generator(engine, arch, template, tiler, description)


def prepare_generation(model_dir: PathLike, data_path: PathLike, tokenizer_dir: Optional[PathLike], max_tiles: int,
                       max_new_tokens: int, seed: int, limit: Optional[int], device: str,
                       tiler_data: Any, load_engine: Optional[Callable[..., tuple]] = None) -> GenerationSetup:
    """The records of a prompts JSONL and the checkpoint (:func:`load_generator`), every prompt
    leaving ``max_new_tokens`` positions for its response."""
    from megatron_r1v.data.schema import load_records

    records = load_records(data_path, "prompts").records[:limit]
    generator = load_generator(model_dir, tokenizer_dir, max_tiles, device, tiler_data, max_new_tokens, load_engine)
    return generator.setup(records, seed)


def build_requests(run: GenerationSetup, batch: Sequence[Any]) -> list:
    """The engine's requests for ``batch`` (records of ``run.records``), tiled in one call."""
    from megatron_r1v.rollout.engine import RolloutRequest

    requests = []
    for record, item in zip(batch, run.loader.prepare_many(batch), strict=True):  # one tiling call per batch
        assert item is not None  # on_bad_sample="error": a bad prompt raises instead
        requests.append(RolloutRequest(record.id, item.prompt_ids, item.pixel_values))
    return requests


