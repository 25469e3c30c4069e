"""Rejection sampling for SFT: n responses per prompt, keep the ones the rule + format reward accepts.

    python tools/rejection_sample.py --model HF_DIR --prompts prompts.jsonl --out DIR \\
        [--samples 8] [--temperature 1.0] [--top-p 1.0] [--max-new-tokens 256] [--keep-shortest K] \\
        [--seed 0] [--batch-size 8] [--max-tiles 12] [--tokenizer DIR] [--device cpu] [--engine hf] \\
        [--tiler auto|dali|pil] [--tiler-threads 2] [--chat-template auto|qwq|qwen2.5|r1-distill]

The data step of R1V's iterative SFT (and R1V3's cold start): each prompt of a ``prompts``
JSONL (``data/schema.py``) is prepared exactly as ``python -m megatron_r1v.evaluate``
prepares it (same engine loading, the tokenizer's chat template or ``--chat-template``'s,
tiler: ``evaluate.prepare_generation``), answered ``--samples`` times by the HF rollout
engine, and each response is judged with the terms of the training reward
(``evaluate.score_text``: ``rewards.hybrid.HybridReward``, no reward model). A response is
**accepted** when it ended at the template's reply-closing token (``<|im_end|>``,
``<｜end▁of▁sentence｜>``; not cut at ``--max-new-tokens``), has the R1 format (r_format = 1),
its final ``\\boxed{}`` answer is right (r_rule = 1), and it holds no chat / image special
token as text (it could not be trained on). Identical accepted texts of
one prompt are kept once; ``--keep-shortest K`` then keeps the K shortest (in tokens, ties
by sample order), R1V's adaptive-length distillation that prefers concise reasoning.

Outputs in ``--out`` (each written to a temporary and renamed: never half-written):

* ``sft.jsonl``: one ``sft`` record per kept response, ``{"id": "<prompt id>#k<sample>",
  "images" (relative to --out), "messages": [user: the question as the prompt had it
  (``<image>`` placeholders included), assistant: the response without its closing token,
  after "<think>\\n" when the generation prompt opened the thought]}``; ``data.template``
  removes that leading ``<think>\\n`` again, so the trained reply is exactly the sampled one;
* ``summary.json``: prompts, samples, accepted, kept, acceptance rate overall and per
  answer type, the first reason of each rejection, mean / median response length in tokens
  (generated ids, the stop token included) of accepted and rejected samples, the prompts
  with no accepted sample, and the settings;
* ``lengths.png``: histograms of the accepted and rejected response lengths;
* ``samples.jsonl`` (progress) and ``run.json`` (the settings that decide the samples).

Resumable: the prompts are generated in batches of ``--batch-size`` prompts (batch ``b`` of
the file with seed ``seed + b``); after each batch its prompts' responses are appended to
``samples.jsonl`` and flushed to disk. A rerun skips the prompts already there, regenerates
a partly written batch whole (so every sample is what an uninterrupted run draws, on the
same device) and ignores, with a warning, a last line cut by a crash; the final files are
rebuilt from ``samples.jsonl``, so they are identical to an uninterrupted run's. Prompts
appended to the file later are sampled by a rerun (batch boundaries are counted from the
file's start). A rerun into the same ``--out`` with other settings that decide the samples
(model, prompts file, tokenizer, samples, temperature, top-p, max-new-tokens, seed, batch
size, max tiles, engine, chat template) is refused; ``--keep-shortest`` only selects, so a rerun with
another value re-selects without generating. Progress goes to stderr, the summary is the
last stdout line. User errors print ``error: ...`` and exit with status 2 before anything
is generated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megatron_r1v.atomic_dir import write_text_atomic
from megatron_r1v.data.schema import RESERVED_TEXT
from megatron_r1v.rollout.sampling_runs import (
    PromptSamples,
    add_sampling_args,
    check_sampling_arguments,
    check_settings,
    reply_text,
    sample_batches,
    sampling_settings,
    start_run,
    stderr,
    trainable_reply,
    user_error,
)

SFT, SUMMARY, PLOT = "sft.jsonl", "summary.json", "lengths.png"
ENGINES = ("hf",)
# Why a response is rejected: the first of these that applies.
REASONS = ("cut at max_new_tokens", "bad format", "wrong answer", "special token in text")


@dataclass(frozen=True)
class Response:
    """One sampled response and how it scores."""

    text: str
    """Decoded, special tokens kept, without the stop token that ended it."""
    tokens: int
    """Generated ids, the stop token included."""
    finished: bool
    correct: bool
    format_ok: bool
    special_text: bool = False
    """Holds one of the chat template's marker tokens as text (besides ``RESERVED_TEXT``)."""

    @property
    def reason(self) -> Optional[str]:
        """None when accepted, else the first entry of ``REASONS`` that applies."""
        if not self.finished:
            return REASONS[0]
        if not self.format_ok:
            return REASONS[1]
        if not self.correct:
            return REASONS[2]
        if self.special_text or any(token in self.text for token in RESERVED_TEXT):
            return REASONS[3]
        return None

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class PromptResult(PromptSamples):
    """The responses of one prompt, in sample order (one line of ``samples.jsonl``)."""

    responses: tuple[Response, ...]
    response_type = Response


def judge(record: Any, sample: Any, template: Any) -> Response:
    """Scores one ``RolloutSample`` for its ``PromptRecord`` as the evaluation does."""
    from megatron_r1v.evaluate import score_text

    score = score_text(record, sample.text, template.open_think)
    text = reply_text(sample, template)
    special = any(token in text for token in template.reserved_text)
    return Response(text, len(sample.response_ids), bool(sample.finished), score.correct, score.format_ok, special)


def select(responses: Sequence[Response], keep_shortest: Optional[int]) -> list[int]:
    """Indices (ascending) of the responses to keep: the accepted ones, each distinct text once
    (its first sample), then with ``keep_shortest`` the K shortest (ties: the earlier sample)."""
    first: dict[str, int] = {}
    for i, response in enumerate(responses):
        if response.accepted and response.text not in first:
            first[response.text] = i
    kept = list(first.values())
    if keep_shortest is not None:
        kept = sorted(kept, key=lambda i: (responses[i].tokens, i))[:keep_shortest]
    return sorted(kept)


def sft_record(record: Any, response: Response, index: int, out_dir: Path, think_opened: bool = True) -> dict:
    """The ``sft`` record of one kept response (module docstring)."""
    reply = trainable_reply(response.text, think_opened)
    return {"id": f"{record.id}#k{index}", "images": [os.path.relpath(p, out_dir) for p in record.images],
            "messages": [{"role": "user", "content": record.question}, {"role": "assistant", "content": reply}]}


def _lengths(values: Sequence[int]) -> dict:
    return {"mean": statistics.fmean(values) if values else None,
            "median": statistics.median(values) if values else None}


def summarize(records: Sequence[Any], results: dict[str, PromptResult], kept: int, settings: dict) -> dict:
    """The numbers of ``summary.json`` for ``records`` (all in ``results``)."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    accepted_len: list[int] = []
    rejected_len: list[int] = []
    without: list[str] = []
    for record in records:
        responses = results[record.id].responses
        n_ok = 0
        for response in responses:
            if response.accepted:
                n_ok += 1
                accepted_len.append(response.tokens)
            else:
                reasons[response.reason] += 1
                rejected_len.append(response.tokens)
        group = by_type[record.answer_type]
        group.update(prompts=1, samples=len(responses), accepted=n_ok)
        if not n_ok:
            without.append(record.id)

    def rates(c: Counter) -> dict:
        return {"prompts": c["prompts"], "samples": c["samples"], "accepted": c["accepted"],
                "acceptance_rate": c["accepted"] / c["samples"] if c["samples"] else 0.0}

    total = sum(by_type.values(), Counter())
    return {**rates(total), "kept": kept, "by_answer_type": {t: rates(by_type[t]) for t in sorted(by_type)},
            "rejected": {reason: reasons[reason] for reason in REASONS},
            "accepted_tokens": _lengths(accepted_len), "rejected_tokens": _lengths(rejected_len),
            "prompts_without_accepted": len(without), "prompt_ids_without_accepted": without, "settings": settings}


def plot_lengths(records: Sequence[Any], results: dict[str, PromptResult], out: Path) -> None:
    """Histograms of accepted and rejected response lengths (tokens) on one axis, to ``out``."""
    from megatron_r1v.plotting import plot_histograms

    responses = [r for record in records for r in results[record.id].responses]
    accepted = [r.tokens for r in responses if r.accepted]
    rejected = [r.tokens for r in responses if not r.accepted]
    plot_histograms({"accepted": accepted, "rejected": rejected}, out, xlabel="response length (tokens)",
                    ylabel="samples", title=f"rejection sampling: {len(accepted)} of {len(responses)} accepted")


def check_arguments(args: argparse.Namespace) -> None:
    check_sampling_arguments(args, ENGINES, SFT)
    if args.keep_shortest is not None and not 1 <= args.keep_shortest <= args.samples:
        raise ValueError(f"--keep-shortest must be between 1 and --samples ({args.samples}), got {args.keep_shortest}")


def _accepted_so_far(done: list[PromptResult]) -> str:
    accepted = sum(r.accepted for p in done for r in p.responses)
    samples = sum(len(p.responses) for p in done)
    return f"accepted {accepted}/{samples} ({accepted / samples:.3f})"


def rejection_sample(args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
    """Samples, judges and writes everything (module docstring); returns the summary."""
    check_arguments(args)
    out = Path(args.out)
    settings = sampling_settings(args)
    check_settings(out, settings)
    run, results = start_run(args, settings, PromptResult, progress)
    template = run.loader.template

    def score(records: Sequence[Any], groups: Sequence[Sequence[Any]]) -> list[PromptResult]:
        return [PromptResult(record.id, record.answer_type, tuple(judge(record, s, template) for s in group))
                for record, group in zip(records, groups, strict=True)]

    sample_batches(run, args, out, results, score, _accepted_so_far, progress)
    return write_outputs(run.records, results, args.keep_shortest, out, settings, run.think_opened)


def write_outputs(records: Sequence[Any], results: dict[str, PromptResult], keep_shortest: Optional[int],
                  out: Path, settings: dict, think_opened: bool = True) -> dict:
    """``sft.jsonl``, ``lengths.png`` and ``summary.json`` from every record's results."""
    lines = [json.dumps(sft_record(record, results[record.id].responses[i], i, out, think_opened),
                        ensure_ascii=False) + "\n"
             for record in records for i in select(results[record.id].responses, keep_shortest)]
    sft_ids = [json.loads(line)["id"] for line in lines]
    clash = next((i for i in sft_ids if sft_ids.count(i) > 1), None) if len(set(sft_ids)) < len(sft_ids) else None
    if clash is not None:
        raise ValueError(f"two kept responses would get the SFT id {clash!r}: a prompt id looks like "
                         "'<another prompt id>#k<n>'; rename it")
    write_text_atomic(out / SFT, "".join(lines))
    plot_lengths(records, results, out / PLOT)
    summary = summarize(records, results, len(lines), {**settings, "keep_shortest": keep_shortest})
    write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/rejection_sample.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(parser, ENGINES)
    parser.add_argument("--keep-shortest", type=int, default=None,
                        help="keep the K shortest accepted responses per prompt (default: all)")
    return parser


def main(argv: Optional[Sequence[str]] = None, progress: Callable[[str], None] = stderr) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = rejection_sample(args, progress)
    except (OSError, ValueError, KeyError) as err:
        return user_error(err)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("prompt_ids_without_accepted", "settings")}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
