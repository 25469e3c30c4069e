"""Held-out accuracy of a checkpoint, generated with the HF rollout engine.

    python -m megatron_r1v.evaluate --model HF_DIR --data prompts.jsonl [--tokenizer DIR] \\
        [--max-tiles 12] [--max-new-tokens 256] [--batch-size 64] [--temperature 0] [--seed 0] \\
        [--limit N] [--out result.json] [--samples-out samples.jsonl] [--device cpu] \\
        [--tiler auto|dali|pil] [--tiler-threads 2] [--chat-template auto|qwq|qwen2.5|r1-distill]

``HF_DIR`` is an InternVL checkpoint in the transformers or the released skywork layout
(``rollout.hf_engine.load_hf_engine``). Each prompt record is prepared exactly as the
GRPO trainer prepares it (images tiled by the tiler ``--tiler`` selects, as ``data.tiler``
does for training: ``data.tilers.build_tiler``, DALI or the PIL reference, identical tiles;
the chat template of ``data.template`` with the tokenizer's turn markers, ``--chat-template``
as ``data.chat_template``) and answered once;
``--temperature 0`` (the default) decodes greedily, so a checkpoint has one score. A
response ends at the template's reply-closing token (``<|im_end|>`` for QwQ,
``<｜end▁of▁sentence｜>`` for R1-Distill) or after ``--max-new-tokens``.

Scores per response, both 1 or 0:

* correct: the rule reward r_rule of Eq. 7 (``rewards.rule.rule_reward``) on the final
  answer, the last ``\\boxed{}`` after ``</think>`` (``rewards.format.extract_answer``);
* format: the format reward r_format (``rewards.format.check_format``, with the thought
  opened by the prompt when the template's generation prompt opens it).

Progress goes to stderr (first the ``tiler: ...`` line, then one line per batch); the last line
of stdout is the result, ``{"accuracy", "format", "num_prompts", "by_answer_type", "seconds",
"model", "tiler", ...}``,
which ``--out`` also writes (atomically). ``--samples-out`` writes one JSON line per
prompt: id, answer, extracted, correct, format, finished, text. User errors (a missing
model folder, bad data) print ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Optional, Sequence, Union

from megatron_r1v.atomic_dir import atomic_file, check_writable, write_text_atomic

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


def summarize(records: Sequence[Any], scores: Sequence[SampleScore]) -> dict:
    """Accuracy and format fractions, overall and per answer type (keys sorted)."""
    by_type: dict[str, list[SampleScore]] = defaultdict(list)
    for record, score in zip(records, scores, strict=True):
        by_type[record.answer_type].append(score)

    def fractions(group: Sequence[SampleScore]) -> dict:
        n = len(group)
        return {"accuracy": sum(s.correct for s in group) / n if n else 0.0,
                "format": sum(s.format_ok for s in group) / n if n else 0.0, "num_prompts": n}

    return {**fractions(scores), "by_answer_type": {t: fractions(by_type[t]) for t in sorted(by_type)}}


def _stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class GenerationSetup:
    """What :func:`evaluate` (and ``tools/rejection_sample.py``) generates with: the records,
    the engine and how prompts are built."""

    records: list
    engine: Any
    loader: Any
    stop_ids: tuple[int, ...]
    think_opened: bool
    tiler: str
    """Which tiler runs (``data.tilers.SelectedTiler.description``)."""


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


def prepare_generation(model_dir: PathLike, data_path: PathLike, tokenizer_dir: Optional[PathLike], max_tiles: int,
                       max_new_tokens: int, seed: int, limit: Optional[int], device: str,
                       tiler_data: Any, load_engine: Optional[Callable[..., tuple]] = None) -> GenerationSetup:
    """Reads the records and the checkpoint; prompts are built as the GRPO trainer builds them.
    ``tiler_data``: a ``DataConfig`` holding the ``--tiler`` / ``--tiler-threads`` /
    ``--chat-template`` choices. ``load_engine``: ``load_hf_engine`` (the default) or a
    function with its signature and result for another rollout engine."""
    from megatron_r1v.data.loader import PromptLoader
    from megatron_r1v.data.schema import load_records
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tilers import build_tiler
    from megatron_r1v.data.tiling import TilingConfig
    from megatron_r1v.rollout.hf_engine import load_hf_engine

    records = load_records(data_path, "prompts").records[:limit]
    engine, arch, tokenizer = (load_engine or load_hf_engine)(model_dir, tokenizer_dir, device)
    # The whole sequence must fit the model's positions: the prompt gets what the
    # response budget leaves.
    max_prompt = arch.decoder.max_position_embeddings - max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{arch.decoder.max_position_embeddings} positions")
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=arch.tokens_per_tile, max_seq_len=max_prompt,
                                                      chat_template=tiler_data.chat_template))
    # The ids are the tokenizer's (the template reads them there); a checkpoint whose config
    # records another <IMG_CONTEXT> id cannot be evaluated with it.
    if template.image_token_id != arch.image_token_id:
        raise ValueError(f"tokenizer {tokenizer_dir or model_dir}: <IMG_CONTEXT> has id {template.image_token_id}, "
                         f"but {os.path.join(model_dir, 'config.json')} records image token id {arch.image_token_id}")
    tiler, description = build_tiler(tiler_data, TilingConfig(image_size=arch.vision.image_size,
                                                               max_tiles=max_tiles), key="--tiler")
    # Only prepare_many() is used (no shuffling): evaluation visits the records in file order.
    loader = PromptLoader(records, template, tiler, seed=seed)
    return GenerationSetup(records, engine, loader, (template.stop_token_id,), template.open_think, description)


def _sample_line(record: Any, score: SampleScore, sample: Any) -> str:
    return json.dumps({
        "id": record.id, "answer": record.answer, "answer_type": record.answer_type, "extracted": score.extracted,
        "correct": score.correct, "format": score.format_ok, "finished": sample.finished, "text": sample.text,
    }, ensure_ascii=False) + "\n"


def build_requests(run: GenerationSetup, batch: Sequence[Any]) -> list:
    """The engine's requests for ``batch`` (records of ``run.records``), tiled in one call."""
    from megatron_r1v.rollout.engine import RolloutRequest

    requests = []
    for record, item in zip(batch, run.loader.prepare_many(batch), strict=True):  # one tiling call per batch
        assert item is not None  # on_bad_sample="error": a bad prompt raises instead
        requests.append(RolloutRequest(record.id, item.prompt_ids, item.pixel_values))
    return requests


def _generate_and_score(run: GenerationSetup, batch_size: int, params: dict, seed: int,
                        samples_file: Optional[IO[str]], progress: Optional[Callable[[str], None]],
                        start: float) -> tuple[list[SampleScore], int, int]:
    """(scores in record order, generated tokens, responses cut at max_new_tokens)."""
    from megatron_r1v.rollout.engine import SamplingParams

    scores: list[SampleScore] = []
    generated_tokens = cut = 0
    num_batches = -(-len(run.records) // batch_size)
    for b in range(num_batches):
        batch = run.records[b * batch_size:(b + 1) * batch_size]
        groups = run.engine.generate(build_requests(run, batch),
                                     SamplingParams(n=1, seed=seed + b, stop_token_ids=run.stop_ids, **params))
        for record, (sample,) in zip(batch, groups, strict=True):
            score = score_text(record, sample.text, run.think_opened)
            scores.append(score)
            generated_tokens += len(sample.response_ids)
            cut += not sample.finished
            if samples_file is not None:
                samples_file.write(_sample_line(record, score, sample))
        if progress is not None:
            so_far = summarize(run.records[:len(scores)], scores)
            progress(f"batch {b + 1}/{num_batches} | prompts {len(scores)}/{len(run.records)} | "
                     f"accuracy {so_far['accuracy']:.3f} | format {so_far['format']:.3f} | "
                     f"{time.perf_counter() - start:.1f}s")
    return scores, generated_tokens, cut


def evaluate(
    model_dir: PathLike,
    data_path: PathLike,
    *,
    tokenizer_dir: Optional[PathLike] = None,
    max_tiles: int = 12,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    limit: Optional[int] = None,
    samples_out: Optional[PathLike] = None,
    device: str = "cpu",
    progress: Optional[Callable[[str], None]] = _stderr_progress,
    tiler: str = "auto",
    tiler_threads: int = 2,
    chat_template: str = "auto",
) -> dict:
    """Generates one response per prompt of ``data_path`` with the checkpoint ``model_dir``
    and scores it (module docstring); returns the result dict the CLI prints.

    Batch ``b`` samples with seed ``seed + b`` (only matters for ``temperature > 0``), so
    a run is reproducible for a batch size. ``limit`` keeps the first ``limit`` records.
    ``tiler`` / ``tiler_threads``: ``data.tiler`` / ``data.tiler_threads`` (``auto``: DALI
    when it can run here, else PIL with a warning; both give the same tiles).
    ``chat_template``: ``data.chat_template``. ``samples_out`` appears only complete.
    Raises FileNotFoundError / ValueError (DataError, ImageError, CheckpointError,
    ChatFormatError, ...) with a message naming the file for user errors.
    """
    start = time.perf_counter()
    from megatron_r1v.config import DataConfig

    check_generation_arguments(model_dir, batch_size, limit, temperature, max_new_tokens, tiler, tiler_threads)
    run = prepare_generation(model_dir, data_path, tokenizer_dir, max_tiles, max_new_tokens, seed, limit, device,
                             DataConfig(max_tiles=max_tiles, tiler=tiler, tiler_threads=tiler_threads,
                                        chat_template=chat_template))
    if progress is not None:
        progress(f"tiler: {run.tiler}")
    params = {"temperature": temperature, "max_new_tokens": max_new_tokens}
    with atomic_file(samples_out) if samples_out is not None else contextlib.nullcontext() as samples_file:
        scores, generated_tokens, cut = _generate_and_score(run, batch_size, params, seed, samples_file, progress,
                                                            start)
    result = summarize(run.records, scores)
    return {
        "accuracy": result["accuracy"], "format": result["format"], "num_prompts": result["num_prompts"],
        "by_answer_type": result["by_answer_type"], "seconds": round(time.perf_counter() - start, 3),
        "model": str(model_dir), "data": str(data_path), "temperature": temperature,
        "max_new_tokens": max_new_tokens, "generated_tokens": generated_tokens,
        "cut_at_max_new_tokens": cut / len(run.records), "tiler": run.tiler,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_r1v.data.chat_format import add_chat_template_arg
    from megatron_r1v.data.tilers import add_tiler_args

    parser = argparse.ArgumentParser(prog="python -m megatron_r1v.evaluate",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="InternVL checkpoint folder (transformers or skywork layout)")
    parser.add_argument("--data", required=True, help="prompts JSONL (data/schema.py, kind prompts)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--max-tiles", type=int, default=12, help="most grid tiles per image (default 12)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts generated together (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0 only)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts only")
    parser.add_argument("--out", type=Path, default=None, help="also write the result JSON here")
    parser.add_argument("--samples-out", type=Path, default=None, help="one JSON line per prompt")
    parser.add_argument("--device", default="cpu", help="torch device of the engine (default cpu)")
    add_tiler_args(parser)
    add_chat_template_arg(parser)
    args = parser.parse_args(argv)
    try:
        for flag, path in (("--out", args.out), ("--samples-out", args.samples_out)):
            if path is not None:  # before the evaluation, whose result would be thrown away
                check_writable(path, flag)
        result = evaluate(
            args.model, args.data, tokenizer_dir=args.tokenizer, max_tiles=args.max_tiles,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
            seed=args.seed, limit=args.limit, samples_out=args.samples_out, device=args.device,
            tiler=args.tiler, tiler_threads=args.tiler_threads, chat_template=args.chat_template,
        )
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    line = json.dumps(result)
    if args.out is not None:
        write_text_atomic(args.out, line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
