"""Resumable sampling runs: n responses per prompt of a prompts file, for the data tools.

``tools/rejection_sample.py`` (SFT data) and ``tools/generate_preferences.py`` (MPO data)
sample the same way and differ only in how they judge a response and what they write.
This module holds the part they share:

* the command line of a run (:func:`add_sampling_args`, :func:`check_sampling_arguments`)
  and the settings that decide its samples (:func:`sampling_settings`, kept in ``run.json``
  and compared on a rerun by :func:`check_settings`);
* loading: each prompt is prepared exactly as ``python -m megatron_r1v.evaluate`` prepares
  it (``evaluate.prepare_generation``: tokenizer chat template or ``--chat-template``,
  ``--tiler``), with the rollout engine ``--engine`` names (:func:`engine_loader`);
* the loop (:func:`sample_batches`): the prompts in batches of ``--batch-size`` (batch
  ``b`` of the file with seed ``seed + b``); after each batch the new prompts' lines are
  appended to ``samples.jsonl`` and flushed to disk. A rerun skips the prompts already
  there (:func:`resume_progress`), regenerates a partly written batch whole (so every
  sample is the one an uninterrupted run draws, on the same device and engine) and drops,
  with a warning, a last line cut by a crash.

A tool's line of ``samples.jsonl`` is a :class:`PromptSamples` subclass: the prompt id,
its answer type and one response record per sample, in sample order.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, TypeVar

from megatron_r1v.atomic_dir import check_writable, write_text_atomic
from megatron_r1v.data.tokenizer import THINK_START

PROGRESS, RUN = "samples.jsonl", "run.json"
ENGINES = ("hf", "sglang")
# SGLang runs alone here (not colocated with training), so it may take most of the GPU.
SGLANG_MEM_FRACTION = 0.85


@dataclass(frozen=True)
class PromptSamples:
    """One line of ``samples.jsonl``: a prompt's responses in sample order. Subclasses set
    ``response_type``, a dataclass written with ``asdict`` and read back with ``**``."""

    id: str
    answer_type: str
    responses: tuple
    response_type: ClassVar[type]

    def to_line(self) -> str:
        return json.dumps({"id": self.id, "answer_type": self.answer_type,
                           "responses": [asdict(r) for r in self.responses]}, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, obj: dict) -> "PromptSamples":
        return cls(obj["id"], obj["answer_type"], tuple(cls.response_type(**r) for r in obj["responses"]))


Line = TypeVar("Line", bound=PromptSamples)
# Judges the new prompts of a batch: (records, their sample groups) -> one line per record.
ScoreBatch = Callable[[Sequence[Any], Sequence[Sequence[Any]]], list]


def stderr(line: str) -> None:
    """The default progress sink: stderr, flushed (stdout is the tools' result)."""
    print(line, file=sys.stderr, flush=True)


def reply_text(sample: Any, template: Any) -> str:
    """A ``RolloutSample``'s text without the template's reply-closing token that ended it
    (the training template appends that token itself)."""
    end = template.format.reply_end
    return sample.text[:-len(end)] if sample.finished and sample.text.endswith(end) else sample.text


def trainable_reply(text: str, think_opened: bool) -> str:
    """The reply as a training record holds it: after ``<think>\\n`` when the generation
    prompt opened the thought (``data.template`` strips that prefix again, so the trained
    tokens are exactly the sampled ones), else as sampled."""
    opened = think_opened and not text.startswith(THINK_START + "\n")
    return f"{THINK_START}\n{text}" if opened else text


def add_sampling_args(parser: argparse.ArgumentParser, engines: Sequence[str]) -> None:
    """The arguments every sampling tool takes (defaults as ``tools/rejection_sample.py`` had them)."""
    from megatron_r1v.data.chat_format import add_chat_template_arg
    from megatron_r1v.data.tilers import add_tiler_args

    parser.add_argument("--model", required=True, help="InternVL checkpoint folder (transformers or skywork layout)")
    parser.add_argument("--prompts", required=True, help="prompts JSONL (data/schema.py, kind prompts)")
    parser.add_argument("--out", required=True, help="output folder (resumed when it holds a run)")
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt (default 8)")
    parser.add_argument("--temperature", type=float, default=1.0, help="default 1.0; 0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="batch b samples with seed + b")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--max-tiles", type=int, default=12, help="most grid tiles per image (default 12)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--device", default=None,
                        help="torch device of the engine (default: cpu for hf, cuda:0 for sglang)")
    parser.add_argument("--engine", default="hf", help=f"rollout engine: {' or '.join(engines)} (default hf)")
    if "sglang" in engines:
        parser.add_argument("--tp", type=int, default=1,
                            help="sglang: GPUs of the engine (tensor parallel), from --device's index on (default 1)")
    add_tiler_args(parser)
    add_chat_template_arg(parser)


def check_sampling_arguments(args: argparse.Namespace, engines: Sequence[str], first_output: str) -> None:
    """Raises ValueError / FileNotFoundError naming the flag, before anything slow;
    ``first_output`` is the file of ``--out`` probed for writing."""
    from megatron_r1v.evaluate import check_generation_arguments

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    check_generation_arguments(args.model, args.batch_size, None, args.temperature, args.max_new_tokens,
                               args.tiler, args.tiler_threads, top_p=args.top_p)
    check_engine_arguments(args.engine, getattr(args, "tp", 1), args.device, engines)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    check_writable(Path(args.out) / first_output, "--out")


def check_engine_arguments(engine: str, tp: int, device: Optional[str], engines: Sequence[str] = ENGINES) -> None:
    """``--engine`` / ``--tp`` / ``--device``: ValueError naming the flag (SGLang: a GPU and the package)."""
    if engine not in engines:
        raise ValueError(f"--engine must be one of {', '.join(engines)}, got {engine!r}")
    if tp != 1 and (engine != "sglang" or tp < 1):
        raise ValueError(f"--tp must be >= 1 and is for --engine sglang only, got {tp}")
    if engine == "sglang":
        _check_sglang(device)


def _check_sglang(device: Optional[str]) -> None:
    import importlib.util

    import torch

    from megatron_r1v.rollout.sglang_engine import ROLLOUT_EXTRA

    if device is not None and not device.startswith("cuda"):
        raise ValueError(f"--engine sglang runs on a GPU; --device must be cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError("--engine sglang needs a CUDA GPU; use --engine hf on a machine without one")
    if importlib.util.find_spec("sglang") is None:
        raise ValueError(f"--engine sglang: sglang is not installed ({ROLLOUT_EXTRA}, or use the docker/Dockerfile "
                         "image)")


def sampling_settings(args: argparse.Namespace) -> dict:
    """What decides the samples (``run.json``): a rerun must have the same."""
    return {"model": os.path.abspath(args.model), "prompts": os.path.abspath(args.prompts),
            "tokenizer": os.path.abspath(args.tokenizer) if args.tokenizer else None, "samples": args.samples,
            "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "batch_size": args.batch_size, "max_tiles": args.max_tiles, "engine": args.engine,
            "chat_template": args.chat_template}


def check_settings(out: Path, settings: dict) -> None:
    """ValueError when ``out`` holds a run with other settings, or a progress file of no run."""
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


def read_progress(path: Path, line_type: type[Line], warn: Callable[[str], None]) -> dict[str, Line]:
    """The lines of ``samples.jsonl`` by prompt id. A cut last line (a crash while writing it)
    is dropped from the file with a warning; any other bad line is a ValueError naming FILE:LINE."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):  # no newline after the last line: its write never finished
        warn(f"warning: {path}: ignoring a cut last line ({len(raw) - end} bytes) left by an interrupted run; "
             "its prompt is sampled again")
        raw = raw[:end]
        write_text_atomic(path, raw.decode("utf-8"))
    results: dict[str, Line] = {}
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            result = line_type.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a line this tool wrote ({err}); remove {path} to start over"
                             ) from None
        results[result.id] = result
    return results


def engine_loader(args: argparse.Namespace) -> Callable[..., tuple]:
    """``load_hf_engine``'s signature for the engine ``--engine`` names."""
    if args.engine == "hf":
        from megatron_r1v.rollout.hf_engine import load_hf_engine

        return load_hf_engine
    return functools.partial(_load_sglang_engine, tp_size=args.tp)


def _load_sglang_engine(model_dir: Any, tokenizer_dir: Any, device: str, tp_size: int) -> tuple:
    """(engine, architecture, tokenizer) of an SGLang engine on ``tp_size`` GPUs from ``device``'s
    on, from a skywork-layout checkpoint; the tokenizer is ``tokenizer_dir``'s, else the model's."""
    import torch

    from megatron_r1v.data.tokenizer import load_tokenizer
    from megatron_r1v.rollout.sglang_engine import SGLangRolloutEngine

    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    engine = SGLangRolloutEngine(model_dir=str(model_dir), tp_size=tp_size,
                                 base_gpu_id=torch.device(device).index or 0,
                                 mem_fraction_static=SGLANG_MEM_FRACTION, tokenizer=tokenizer)
    return engine, engine.arch, engine.tokenizer


def prepare_run(args: argparse.Namespace, progress: Callable[[str], None]) -> Any:
    """``evaluate.prepare_generation`` with the tool's arguments (a ``GenerationSetup``)."""
    from megatron_r1v.config import DataConfig
    from megatron_r1v.evaluate import prepare_generation

    device = args.device or ("cpu" if args.engine == "hf" else "cuda:0")
    run = prepare_generation(args.model, args.prompts, args.tokenizer, args.max_tiles, args.max_new_tokens,
                             args.seed, None, device, DataConfig(max_tiles=args.max_tiles, tiler=args.tiler,
                                                                 tiler_threads=args.tiler_threads,
                                                                 chat_template=args.chat_template),
                             load_engine=engine_loader(args))
    progress(f"tiler: {run.tiler}")
    return run


def resume_progress(out: Path, records: Sequence[Any], line_type: type[Line], prompts: str,
                    progress: Callable[[str], None]) -> dict[str, Line]:
    """The lines already in ``out/samples.jsonl``, saying what a rerun resumes and what it ignores."""
    ids = [r.id for r in records]
    results = read_progress(out / PROGRESS, line_type, progress)
    unknown = sorted(set(results) - set(ids))
    if unknown:
        progress(f"warning: {out / PROGRESS} holds {len(unknown)} prompt(s) not in {prompts} "
                 f"(first: {unknown[0]}); they are left out of the outputs")
    done = sum(i in results for i in ids)
    if done:
        progress(f"resuming: {done} of {len(ids)} prompts already sampled")
    return results


def start_run(args: argparse.Namespace, settings: dict, line_type: type[Line],
              progress: Callable[[str], None]) -> tuple[Any, dict[str, Line]]:
    """(the ``GenerationSetup``, the lines already sampled): loads the prompts and the model,
    reads ``samples.jsonl`` and records ``settings`` in ``run.json`` (checked by the caller
    with :func:`check_settings` first)."""
    out = Path(args.out)
    run = prepare_run(args, progress)
    results = resume_progress(out, run.records, line_type, args.prompts, progress)
    write_text_atomic(out / RUN, json.dumps(settings, indent=2) + "\n")
    return run, results


def sample_batches(run: Any, args: argparse.Namespace, out: Path, results: dict[str, Line], score: ScoreBatch,
                   describe: Callable[[list[Line]], str], progress: Callable[[str], None],
                   shutdown: bool = True) -> None:
    """Samples every prompt of ``run.records`` missing from ``results`` (module docstring),
    adding its line to ``results`` and ``out/samples.jsonl``; ``describe`` sums up the
    lines so far for the progress line of each batch. ``args.repetition_penalty`` (1.0 when
    absent) goes to the engine. A response gets ``--max-new-tokens`` or what the model's
    positions leave after its own prompt, whichever is less (said once).
    ``shutdown``: stop an SGLang engine at the end (not when a suite reuses it)."""
    from megatron_r1v.evaluate import build_requests
    from megatron_r1v.rollout.engine import SamplingParams

    start = time.perf_counter()
    ids = [r.id for r in run.records]
    bs = args.batch_size
    num_batches = -(-len(ids) // bs)
    params = dict(n=args.samples, temperature=args.temperature, top_p=args.top_p,
                  repetition_penalty=getattr(args, "repetition_penalty", 1.0), stop_token_ids=run.stop_ids)
    limited = False
    # SGLang's scheduler processes outlive its Python objects: stop them, also after a failure.
    with contextlib.ExitStack() as stack, open(out / PROGRESS, "a", encoding="utf-8") as progress_file:
        if shutdown and hasattr(run.engine, "shutdown"):
            stack.callback(run.engine.shutdown)
        for b in range(num_batches):
            batch = run.records[b * bs:(b + 1) * bs]
            if all(r.id in results for r in batch):
                continue
            requests = build_requests(run, batch)
            for request in requests:  # each its own budget: one long prompt does not cut the others
                request.max_new_tokens = run.max_positions - len(request.prompt_ids)
            budgets = [min(r.max_new_tokens, args.max_new_tokens) for r in requests]
            if min(budgets) < args.max_new_tokens and not limited:
                limited = True
                progress(f"note: --max-new-tokens {args.max_new_tokens} does not fit the model's {run.max_positions} "
                         f"positions; a response gets what its prompt leaves ({min(budgets)} tokens here)")
            # The whole batch, so each sample is the one an uninterrupted run draws.
            groups = run.engine.generate(requests, SamplingParams(seed=args.seed + b, max_new_tokens=args.max_new_tokens,
                                                                  **params))
            new = [(record, group) for record, group in zip(batch, groups, strict=True) if record.id not in results]
            lines = score([record for record, _ in new], [group for _, group in new])
            for line in lines:
                results[line.id] = line
                progress_file.write(line.to_line())
            progress_file.flush()
            os.fsync(progress_file.fileno())
            done = [results[i] for i in ids if i in results]
            progress(f"batch {b + 1}/{num_batches} | prompts {len(done)}/{len(ids)} | {describe(done)} | "
                     f"{time.perf_counter() - start:.1f}s")


def user_error(err: BaseException) -> int:
    """Prints ``error: ...`` for an OSError / ValueError / KeyError and returns exit status 2."""
    print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
    return 2
