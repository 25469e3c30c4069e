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
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megatron_r1v.atomic_dir import atomic_file, check_writable, write_text_atomic
from megatron_r1v.data.schema import RESERVED_TEXT
from megatron_r1v.data.tokenizer import THINK_START

PROGRESS, RUN, SFT, SUMMARY, PLOT = "samples.jsonl", "run.json", "sft.jsonl", "summary.json", "lengths.png"
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
class PromptResult:
    """The responses of one prompt, in sample order (one line of ``samples.jsonl``)."""

    id: str
    answer_type: str
    responses: tuple[Response, ...]

    def to_line(self) -> str:
        return json.dumps({"id": self.id, "answer_type": self.answer_type,
                           "responses": [asdict(r) for r in self.responses]}, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, obj: dict) -> "PromptResult":
        return cls(obj["id"], obj["answer_type"], tuple(Response(**r) for r in obj["responses"]))


def judge(record: Any, sample: Any, template: Any) -> Response:
    """Scores one ``RolloutSample`` for its ``PromptRecord`` as the evaluation does."""
    from megatron_r1v.evaluate import score_text

    score = score_text(record, sample.text, template.open_think)
    end = template.format.reply_end
    text = sample.text[:-len(end)] if sample.finished and sample.text.endswith(end) else sample.text
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
    opened = think_opened and not response.text.startswith(THINK_START + "\n")
    reply = f"{THINK_START}\n{response.text}" if opened else response.text
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    responses = [r for record in records for r in results[record.id].responses]
    accepted = [r.tokens for r in responses if r.accepted]
    rejected = [r.tokens for r in responses if not r.accepted]
    figure = Figure(figsize=(6.0, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    low, high = min(r.tokens for r in responses), max(r.tokens for r in responses)
    bins = [low + (high - low + 1) * i / 30 for i in range(31)]
    for values, label in ((accepted, "accepted"), (rejected, "rejected")):
        axes.hist(values, bins=bins, alpha=0.6, label=f"{label} ({len(values)})")
    axes.set_xlabel("response length (tokens)")
    axes.set_ylabel("samples")
    axes.set_title(f"rejection sampling: {len(accepted)} of {len(responses)} accepted", fontsize=10)
    axes.legend(fontsize=8)
    with atomic_file(out, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)


def read_progress(path: Path, warn: Callable[[str], None]) -> dict[str, PromptResult]:
    """The results in ``samples.jsonl``. A cut last line (a crash while writing it) is dropped
    from the file with a warning; any other bad line is a ValueError naming FILE:LINE."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):  # no newline after the last line: its write never finished
        warn(f"warning: {path}: ignoring a cut last line ({len(raw) - end} bytes) left by an interrupted run; "
             "its prompt is sampled again")
        raw = raw[:end]
        write_text_atomic(path, raw.decode("utf-8"))
    results: dict[str, PromptResult] = {}
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            result = PromptResult.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a line this tool wrote ({err}); remove {path} to start over"
                             ) from None
        results[result.id] = result
    return results


def _settings(args: argparse.Namespace) -> dict:
    """What decides the samples (``run.json``): a rerun must have the same."""
    return {"model": os.path.abspath(args.model), "prompts": os.path.abspath(args.prompts),
            "tokenizer": os.path.abspath(args.tokenizer) if args.tokenizer else None, "samples": args.samples,
            "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "batch_size": args.batch_size, "max_tiles": args.max_tiles, "engine": args.engine,
            "chat_template": args.chat_template}


def _check_settings(out: Path, settings: dict) -> None:
    run_file = out / RUN
    if not run_file.exists():
        if (out / PROGRESS).exists():
            raise ValueError(f"{out / PROGRESS} exists without {run_file}: not a run of this tool; use another --out")
        return
    try:
        before = json.loads(run_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{run_file} is not valid JSON ({err}); use another --out") from None
    changed = [f"{key} {before.get(key)!r} -> {value!r}" for key, value in settings.items() if before.get(key) != value]
    if changed:
        raise ValueError(f"--out {out} holds a run with other sampling settings ({'; '.join(changed)}); "
                         "rerun with its settings to resume it, or use another --out")


def check_arguments(args: argparse.Namespace) -> None:
    from megatron_r1v.evaluate import check_generation_arguments

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.keep_shortest is not None and not 1 <= args.keep_shortest <= args.samples:
        raise ValueError(f"--keep-shortest must be between 1 and --samples ({args.samples}), got {args.keep_shortest}")
    if args.engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {args.engine!r}")
    check_generation_arguments(args.model, args.batch_size, None, args.temperature, args.max_new_tokens,
                               args.tiler, args.tiler_threads, top_p=args.top_p)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    check_writable(Path(args.out) / SFT, "--out")


def rejection_sample(args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
    """Samples, judges and writes everything (module docstring); returns the summary."""
    from megatron_r1v.config import DataConfig
    from megatron_r1v.evaluate import build_requests, prepare_generation
    from megatron_r1v.rollout.engine import SamplingParams

    start = time.perf_counter()
    check_arguments(args)
    out = Path(args.out)
    settings = _settings(args)
    _check_settings(out, settings)
    run = prepare_generation(args.model, args.prompts, args.tokenizer, args.max_tiles, args.max_new_tokens,
                             args.seed, None, args.device, DataConfig(max_tiles=args.max_tiles, tiler=args.tiler,
                                                                      tiler_threads=args.tiler_threads,
                                                                      chat_template=args.chat_template))
    progress(f"tiler: {run.tiler}")
    ids = [r.id for r in run.records]
    results = read_progress(out / PROGRESS, progress)
    unknown = sorted(set(results) - set(ids))
    if unknown:
        progress(f"warning: {out / PROGRESS} holds {len(unknown)} prompt(s) not in {args.prompts} "
                 f"(first: {unknown[0]}); they are left out of the outputs")
    write_text_atomic(out / RUN, json.dumps(settings, indent=2) + "\n")
    params = dict(n=args.samples, temperature=args.temperature, top_p=args.top_p,
                  max_new_tokens=args.max_new_tokens, stop_token_ids=run.stop_ids)
    bs = args.batch_size
    num_batches = -(-len(ids) // bs)
    if any(i in results for i in ids):
        progress(f"resuming: {sum(i in results for i in ids)} of {len(ids)} prompts already sampled")
    with open(out / PROGRESS, "a", encoding="utf-8") as progress_file:
        for b in range(num_batches):
            batch = run.records[b * bs:(b + 1) * bs]
            if all(r.id in results for r in batch):
                continue
            # The whole batch, so each sample is the one an uninterrupted run draws.
            groups = run.engine.generate(build_requests(run, batch), SamplingParams(seed=args.seed + b, **params))
            for record, group in zip(batch, groups, strict=True):
                if record.id not in results:
                    results[record.id] = PromptResult(
                        record.id, record.answer_type, tuple(judge(record, s, run.loader.template) for s in group))
                    progress_file.write(results[record.id].to_line())
            progress_file.flush()
            os.fsync(progress_file.fileno())
            done = [results[i] for i in ids if i in results]
            accepted = sum(r.accepted for p in done for r in p.responses)
            samples = sum(len(p.responses) for p in done)
            progress(f"batch {b + 1}/{num_batches} | prompts {len(done)}/{len(ids)} | accepted {accepted}/{samples} "
                     f"({accepted / samples:.3f}) | {time.perf_counter() - start:.1f}s")
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


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from megatron_r1v.data.chat_format import add_chat_template_arg
    from megatron_r1v.data.tilers import add_tiler_args

    parser = argparse.ArgumentParser(prog="tools/rejection_sample.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="InternVL checkpoint folder (transformers or skywork layout)")
    parser.add_argument("--prompts", required=True, help="prompts JSONL (data/schema.py, kind prompts)")
    parser.add_argument("--out", required=True, help="output folder (resumed when it holds a run)")
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt (default 8)")
    parser.add_argument("--temperature", type=float, default=1.0, help="default 1.0; 0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--keep-shortest", type=int, default=None,
                        help="keep the K shortest accepted responses per prompt (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="batch b samples with seed + b")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--max-tiles", type=int, default=12, help="most grid tiles per image (default 12)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--device", default="cpu", help="torch device of the engine (default cpu)")
    parser.add_argument("--engine", default="hf", help="rollout engine: hf (transformers; the only one here)")
    add_tiler_args(parser)
    add_chat_template_arg(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None, progress: Callable[[str], None] = _stderr) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = rejection_sample(args, progress)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k not in ("prompt_ids_without_accepted", "settings")}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
