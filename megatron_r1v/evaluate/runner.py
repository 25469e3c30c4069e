"""One benchmark run: read the file, sample ``k`` responses per item, score, sum up; resumable.

The loop is the data tools' (``rollout.sampling_runs.sample_batches``): items in batches of
``batch_size`` (batch ``b`` sampled with seed ``seed + b``), all ``k`` responses of an item
from one engine call. After each batch its items' lines are appended to
``OUT/samples.jsonl`` and flushed to disk, so a run killed at any point is resumed by running
the same command again: the items already there are kept, a partly written batch is sampled
again whole (every sample is the one an uninterrupted run draws, on the same device), a last
line cut by the crash is dropped with a warning. ``OUT/run.json`` holds the settings that
decide the samples; a rerun with other ones is refused before anything loads.

Each response is scored by the benchmark's rule (``evaluate.scoring.score_response``) and,
with a judge, by the LLM judge (``evaluate.judge``); ``correct`` is the rule's verdict or the
judge's (either suffices, as in Skywork's own MMMU post-processing: the rule catches what the
judge misreads, the judge what the rule cannot parse). Every response line keeps the text,
the extracted answer, both verdicts, the R1 format check, the token count and whether it
ended. ``OUT/result.json`` (written atomically at the end) holds ``evaluate.metrics.summarize``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

from megatron_r1v.rollout.sampling_runs import PromptSamples

RESULT = "result.json"


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled; the defaults are Skywork R1V's released inference
    (``inference_with_transformers.py``: temperature 0.6, top-p 0.95, repetition penalty
    1.05, up to 64000 new tokens)."""

    samples: int = 1
    """k: responses per item (pass@1 is averaged over them, pass@k counts any correct)."""
    temperature: float = 0.6
    """0: greedy (then every sample is the same)."""
    top_p: float = 0.95
    repetition_penalty: float = 1.05
    max_new_tokens: int = 64000
    """Limited per batch by what the model's positions leave after the longest prompt."""
    batch_size: int = 8
    """Items generated together (each with its k samples)."""
    seed: int = 0

    def __post_init__(self) -> None:
        from megatron_r1v.rollout.engine import SamplingParams

        for flag, value in (("--samples", self.samples), ("--batch-size", self.batch_size),
                            ("--max-new-tokens", self.max_new_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
        try:  # the engines' own checks, worded with the flag names
            SamplingParams(n=self.samples, temperature=self.temperature, top_p=self.top_p,
                           repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens)
        except (ValueError, TypeError) as err:
            raise ValueError(f"--temperature / --top-p / --repetition-penalty: {err}") from None


@dataclass(frozen=True)
class ScoredSample:
    """One response of an item, as a line of ``samples.jsonl`` keeps it."""

    text: str
    tokens: int
    """Generated ids, the stop token included."""
    finished: bool
    """False: cut at the token budget."""
    extracted: Optional[str]
    method: str
    """How the answer was found (``evaluate.scoring``: boxed, answer-phrase, ...)."""
    rule: bool
    judge: Optional[bool]
    """The judge's verdict; None without a judge or when its reply had none."""
    judge_error: Optional[str]
    correct: bool
    """rule or judge."""
    format: bool
    """R1 format: ``rewards.format.check_format`` (thought closed, one boxed answer after it)."""


@dataclass(frozen=True)
class ItemSamples(PromptSamples):
    """A line of ``samples.jsonl``: an item's responses in sample order (``answer_type`` holds
    the item's answer kind)."""

    category: str = ""
    answers: tuple = ()
    response_type: ClassVar[type] = ScoredSample

    def to_line(self) -> str:
        return json.dumps({"id": self.id, "category": self.category, "answer_type": self.answer_type,
                           "answers": list(self.answers), "responses": [asdict(r) for r in self.responses]},
                          ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, obj: dict) -> "ItemSamples":
        return cls(obj["id"], obj["answer_type"], tuple(ScoredSample(**r) for r in obj["responses"]),
                   obj["category"], tuple(obj["answers"]))


def score_batch(items: Sequence[Any], groups: Sequence[Sequence[Any]], think_opened: bool,
                judge: Any = None) -> list[ItemSamples]:
    """The lines of a batch's new items: every response scored by the rule, and by ``judge``
    (a ``JudgeClient``) when there is one, all of the batch's responses in one judge call."""
    from megatron_r1v.evaluate.scoring import score_response
    from megatron_r1v.rewards.format import check_format

    pairs = [(item, sample.text) for item, group in zip(items, groups, strict=True) for sample in group]
    verdicts = judge.judge_many(pairs) if judge is not None and pairs else [None] * len(pairs)
    lines, position = [], 0
    for item, group in zip(items, groups):
        responses = []
        for sample in group:
            rule, judged = score_response(item, sample.text), verdicts[position]
            position += 1
            judge_correct = None if judged is None else judged.correct
            responses.append(ScoredSample(
                text=sample.text, tokens=len(sample.response_ids), finished=bool(sample.finished),
                extracted=rule.extracted, method=rule.method, rule=rule.correct, judge=judge_correct,
                judge_error=None if judged is None else judged.error, correct=rule.correct or bool(judge_correct),
                format=check_format(sample.text, think_opened).score == 1.0))
        lines.append(ItemSamples(item.id, item.answer_kind, tuple(responses), item.category, item.answers))
    return lines


def describe(lines: Sequence[ItemSamples]) -> str:
    """The progress line's numbers so far."""
    from megatron_r1v.evaluate.metrics import pass_rates

    samples = [r for line in lines for r in line.responses]
    mean_tokens = sum(s.tokens for s in samples) / len(samples) if samples else 0.0
    cut = sum(not s.finished for s in samples) / len(samples) if samples else 0.0
    return f"pass@1 {pass_rates(lines)['pass@1']:.3f} | mean tokens {mean_tokens:.0f} | cut {cut:.2f}"


@dataclass(frozen=True)
class BenchmarkRun:
    """One benchmark of a run or a suite, its items read and its folder checked."""

    name: str
    """Label in tables (the benchmark name, or the suite entry's name)."""
    benchmark: str
    data: Path
    items: tuple
    settings: SamplingSettings
    out: Path
    run_settings: dict
    """What decides the samples (``run.json``)."""


def plan_run(name: str, benchmark: str, data: Path, limit: Optional[int], settings: SamplingSettings, out: Path,
             model_settings: dict) -> BenchmarkRun:
    """Reads and validates the benchmark file and checks ``out`` (a folder holding another
    run's settings is refused), before any model is loaded; creates nothing."""
    from megatron_r1v.evaluate.formats import read_benchmark
    from megatron_r1v.rollout.sampling_runs import check_settings

    items = tuple(read_benchmark(benchmark, data, limit=limit))
    if not items:
        raise ValueError(f"{data}: no {benchmark} items to evaluate")
    run_settings = {"benchmark": benchmark, "data": os.path.abspath(data), "limit": limit, **model_settings,
                    **asdict(settings)}
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} exists and is not a folder")
    check_settings(out, run_settings)
    return BenchmarkRun(name, benchmark, data, items, settings, out, run_settings)


def run_benchmark(plan: BenchmarkRun, generator: Any, judge: Any, progress: Callable[[str], None],
                  extra: Optional[dict] = None, shutdown: bool = False) -> dict:
    """Samples what ``plan.out`` lacks, scores, writes ``result.json`` and returns the result
    (``extra`` is merged into it: the model, engine, ...)."""
    from megatron_r1v.atomic_dir import write_text_atomic
    from megatron_r1v.evaluate.metrics import summarize
    from megatron_r1v.rollout.sampling_runs import RUN, resume_progress, sample_batches

    start = time.perf_counter()
    plan.out.mkdir(parents=True, exist_ok=True)
    run = generator.setup(plan.items, plan.settings.seed)
    results = resume_progress(plan.out, plan.items, ItemSamples, str(plan.data), progress)
    write_text_atomic(plan.out / RUN, json.dumps(plan.run_settings, indent=2) + "\n")
    progress(f"{plan.name}: {len(plan.items)} items x {plan.settings.samples} samples")

    def score(items: Sequence[Any], groups: Sequence[Sequence[Any]]) -> list:
        return score_batch(items, groups, run.think_opened, judge)

    sample_batches(run, argparse.Namespace(**asdict(plan.settings)), plan.out, results, score, describe, progress,
                   shutdown=shutdown)
    lines = [results[item.id] for item in plan.items]
    result = {"benchmark": plan.benchmark, "name": plan.name,
              **summarize(plan.items, lines, plan.settings.samples),
              "data": str(plan.data), "seconds": round(time.perf_counter() - start, 3),
              **{key: plan.run_settings[key] for key in ("temperature", "top_p", "repetition_penalty",
                                                         "max_new_tokens", "seed")},
              "tiler": run.tiler, **(extra or {})}
    write_text_atomic(plan.out / RESULT, json.dumps(result, indent=2) + "\n")
    return result
