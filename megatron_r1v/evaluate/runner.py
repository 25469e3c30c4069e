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
JUDGE_REPLY_CHARS = 2000


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

        for flag, value, least in (("--samples", self.samples, 1), ("--batch-size", self.batch_size, 1),
                                   ("--max-new-tokens", self.max_new_tokens, 1), ("--seed", self.seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{flag} must be an integer >= {least}, got {value!r}")
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
    """The judge's verdict; None without a judge, for a response with no final answer (its
    thought never closed: nothing to judge, as for the rule), or when the reply had none."""
    judge_error: Optional[str]
    """Why a judged response has no verdict (e.g. "no verdict" in the reply)."""
    judge_reply: Optional[str]
    """The judge's reply (its first JUDGE_REPLY_CHARS characters), for audits."""
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
    (a ``JudgeClient``) when there is one: the batch's responses that reached a final answer
    (closed their thought), in one judge call."""
    from megatron_r1v.evaluate.scoring import has_final_answer

    pairs = [(item, sample.text) for item, group in zip(items, groups, strict=True) for sample in group]
    asked = [i for i, (_, text) in enumerate(pairs) if judge is not None and has_final_answer(text)]
    verdicts: list = [None] * len(pairs)
    for i, verdict in zip(asked, judge.judge_many([pairs[i] for i in asked]) if asked else []):
        verdicts[i] = verdict
    samples = [sample for group in groups for sample in group]
    scored = [_scored(item, sample, verdict, think_opened)
              for (item, _), sample, verdict in zip(pairs, samples, verdicts, strict=True)]
    lines, start = [], 0
    for item, group in zip(items, groups):
        lines.append(ItemSamples(item.id, item.answer_kind, tuple(scored[start:start + len(group)]), item.category,
                                 item.answers))
        start += len(group)
    return lines


def _scored(item: Any, sample: Any, verdict: Any, think_opened: bool) -> ScoredSample:
    from megatron_r1v.evaluate.scoring import score_response
    from megatron_r1v.rewards.format import check_format

    rule = score_response(item, sample.text)
    judge_correct = None if verdict is None else verdict.correct
    return ScoredSample(
        text=sample.text, tokens=len(sample.response_ids), finished=bool(sample.finished), extracted=rule.extracted,
        method=rule.method, rule=rule.correct, judge=judge_correct,
        judge_error=None if verdict is None else verdict.error,
        judge_reply=None if verdict is None else verdict.reply[:JUDGE_REPLY_CHARS],
        correct=rule.correct or bool(judge_correct), format=check_format(sample.text, think_opened).score == 1.0)


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
    _check_resumable(out, items)
    return BenchmarkRun(name, benchmark, data, items, settings, out, run_settings)


def _check_resumable(out: Path, items: Sequence[Any]) -> None:
    """A rerun resumes only lines of these very items: the same gold answers and kind (a data
    file edited since would otherwise mix old and new scoring)."""
    from megatron_r1v.rollout.sampling_runs import PROGRESS

    path = out / PROGRESS
    if not path.is_file():
        return
    whole = path.read_bytes()
    lines: dict[str, dict] = {}
    for raw in whole[:whole.rfind(b"\n") + 1].splitlines():  # a cut last line is the resume's to drop
        try:
            row = json.loads(raw)
            lines[row["id"]] = row
        except (ValueError, KeyError, TypeError):
            continue  # the resume names a bad line with its number
    for item in items:
        row = lines.get(item.id)
        if row is not None and (tuple(row.get("answers", ())) != item.answers
                                or row.get("answer_type") != item.answer_kind):
            raise ValueError(f"{path} holds item {item.id!r} with gold {row.get('answers')} "
                             f"({row.get('answer_type')}), but {item.source} now has {list(item.answers)} "
                             f"({item.answer_kind}): the data changed; use another --out")


def run_benchmark(plan: BenchmarkRun, generator: Any, judge: Any, progress: Callable[[str], None],
                  extra: Optional[dict] = None) -> dict:
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
                   shutdown=False)  # the caller stops the engine after the last benchmark
    lines = [results[item.id] for item in plan.items]
    result = {"benchmark": plan.benchmark, "name": plan.name,
              **summarize(plan.items, lines, plan.settings.samples),
              "data": str(plan.data), "seconds": round(time.perf_counter() - start, 3),
              **{key: plan.run_settings[key] for key in ("temperature", "top_p", "repetition_penalty",
                                                         "max_new_tokens", "seed")},
              "tiler": run.tiler, **(extra or {})}
    write_text_atomic(plan.out / RESULT, json.dumps(result, indent=2) + "\n")
    return result
