"""``python -m megatron_r1v.evaluate``: the command line (the package docstring has the usage)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megatron_r1v.rollout.sampling_runs import ENGINES, stderr, user_error


def _parser() -> argparse.ArgumentParser:
    from megatron_r1v.data.chat_format import add_chat_template_arg
    from megatron_r1v.data.tilers import add_tiler_args
    from megatron_r1v.evaluate import __doc__ as usage
    from megatron_r1v.evaluate.formats import BENCHMARKS

    parser = argparse.ArgumentParser(prog="python -m megatron_r1v.evaluate", description=usage,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to evaluate (--benchmark with --data, or --suite)")
    what.add_argument("--benchmark", default=None, help=f"one of {', '.join(BENCHMARKS)}")
    what.add_argument("--data", default=None, help="the benchmark's file (or folder of parquet files)")
    what.add_argument("--suite", default=None, type=Path, help="YAML file listing benchmarks (evaluate/suite.py)")
    what.add_argument("--limit", type=int, default=None, help="only the first N items of each benchmark")
    parser.add_argument("--model", required=True, help="InternVL checkpoint folder (transformers or skywork layout)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder, resumed when rerun (default: evaluations/<benchmark or suite>-<settings hash>)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--engine", default="hf", help=f"{' or '.join(ENGINES)} (default hf; sglang: GPU, TP)")
    parser.add_argument("--tp", type=int, default=1, help="sglang: tensor-parallel GPUs from --device's index on")
    parser.add_argument("--device", default=None, help="torch device (default: cpu for hf, cuda:0 for sglang)")
    parser.add_argument("--max-tiles", type=int, default=12, help="most grid tiles per image (default 12)")
    sampling = parser.add_argument_group("sampling (defaults: Skywork R1V's released inference; a suite file's "
                                         "values apply where these are not given)")
    sampling.add_argument("--samples", type=int, default=None, help="k responses per item (default 1)")
    sampling.add_argument("--temperature", type=float, default=None, help="default 0.6; 0: greedy")
    sampling.add_argument("--top-p", type=float, default=None, help="default 0.95")
    sampling.add_argument("--repetition-penalty", type=float, default=None, help="default 1.05")
    sampling.add_argument("--max-new-tokens", type=int, default=None, help="default 64000 (or what the model fits)")
    sampling.add_argument("--batch-size", type=int, default=None, help="items generated together (default 8)")
    sampling.add_argument("--seed", type=int, default=None, help="batch b samples with seed + b (default 0)")
    judge = parser.add_argument_group("LLM judge (optional): an OpenAI-compatible endpoint, e.g. a local SGLang")
    judge.add_argument("--judge-url", default=None, help="base URL, e.g. http://localhost:30000/v1")
    judge.add_argument("--judge-model", default="", help="served model name (default: the server's first)")
    judge.add_argument("--judge-concurrency", type=int, default=8, help="requests in flight (default 8)")
    judge.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    judge.add_argument("--judge-retries", type=int, default=3, help="retries of a failed request (default 3)")
    judge.add_argument("--judge-max-tokens", type=int, default=2048, help="the judge's reply budget (default 2048)")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the endpoint's API key, if it needs one")
    add_tiler_args(parser)
    add_chat_template_arg(parser)
    return parser


def _sampling_overrides(args: argparse.Namespace) -> dict:
    from megatron_r1v.evaluate.suite import SAMPLING_KEYS

    return {key: getattr(args, key) for key in SAMPLING_KEYS}


def _check_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the flag, before anything is read or loaded."""
    from megatron_r1v.evaluate import check_generation_arguments
    from megatron_r1v.rollout.sampling_runs import check_engine_arguments

    if (args.suite is None) == (args.benchmark is None):
        raise ValueError("give --benchmark NAME with --data PATH, or --suite FILE")
    if args.benchmark is not None and args.data is None:
        raise ValueError("--benchmark needs --data (the benchmark's file)")
    if args.suite is not None and args.data is not None:
        raise ValueError("--data is for --benchmark; a suite file names each benchmark's data")
    if args.judge_url is None and args.judge_model:
        raise ValueError("--judge-model needs --judge-url")
    check_engine_arguments(args.engine, args.tp, args.device)
    check_generation_arguments(args.model, 1, args.limit, 0.0, 1, args.tiler, args.tiler_threads)


def _model_settings(args: argparse.Namespace) -> dict:
    """What besides sampling decides a run's samples and verdicts (``run.json``)."""
    return {"model": os.path.abspath(args.model), "tokenizer": os.path.abspath(args.tokenizer) if args.tokenizer
            else None, "engine": args.engine, "max_tiles": args.max_tiles, "chat_template": args.chat_template,
            "judge_url": args.judge_url, "judge_model": args.judge_model if args.judge_url else None}


def _digest(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _plans(args: argparse.Namespace) -> tuple[list, Path]:
    """(the runs, the output folder): every benchmark file read and every folder checked."""
    from megatron_r1v.evaluate.runner import SamplingSettings, plan_run
    from megatron_r1v.evaluate.suite import entry_folder, load_suite, sampling_for

    model_settings = _model_settings(args)
    overrides = _sampling_overrides(args)
    if args.benchmark is not None:
        settings = SamplingSettings(**{k: v for k, v in overrides.items() if v is not None})
        key = [args.benchmark, os.path.abspath(args.data), args.limit, model_settings, settings]
        out = args.out or Path("evaluations") / f"{args.benchmark}-{_digest(key)}"
        return [plan_run(args.benchmark, args.benchmark, Path(args.data), args.limit, settings, out,
                         model_settings)], out
    entries = load_suite(args.suite)
    settings = [sampling_for(entry, overrides) for entry in entries]
    key = [os.path.abspath(args.suite), args.limit, model_settings, settings, [str(e) for e in entries]]
    out = args.out or Path("evaluations") / f"{args.suite.stem}-{_digest(key)}"
    limit = args.limit
    return [plan_run(e.name, e.benchmark, e.data, limit if limit is not None else e.limit, s, entry_folder(out, e),
                     model_settings) for e, s in zip(entries, settings)], out


def _judge(args: argparse.Namespace) -> Any:
    """The judge client, reached once before anything is generated; None without --judge-url."""
    if args.judge_url is None:
        return None
    from megatron_r1v.evaluate.judge import JudgeClient, JudgeConfig

    client = JudgeClient(JudgeConfig(url=args.judge_url, model=args.judge_model, timeout_s=args.judge_timeout,
                                     max_retries=args.judge_retries, concurrency=args.judge_concurrency,
                                     max_tokens=args.judge_max_tokens, api_key_env=args.judge_api_key_env))
    client.check_reachable()
    return client


def _load(args: argparse.Namespace) -> Any:
    from megatron_r1v.config import DataConfig
    from megatron_r1v.evaluate.generation import load_generator
    from megatron_r1v.rollout.sampling_runs import engine_loader

    device = args.device or ("cpu" if args.engine == "hf" else "cuda:0")
    data = DataConfig(max_tiles=args.max_tiles, tiler=args.tiler, tiler_threads=args.tiler_threads,
                      chat_template=args.chat_template)
    # One position kept for the response: longer budgets are cut per batch to what fits.
    return load_generator(args.model, args.tokenizer, args.max_tiles, device, data, 1, engine_loader(args))


def _write_suite(out: Path, suite: Path, model: str, results: Sequence[dict]) -> dict:
    from megatron_r1v.atomic_dir import write_text_atomic
    from megatron_r1v.evaluate.suite import markdown_table, table_row

    rows = [table_row(r) for r in results]
    summary = {"suite": str(suite), "model": model, "benchmarks": rows}
    write_text_atomic(out / "suite.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "suite.md", markdown_table(rows, model))
    return summary


def evaluate_command(args: argparse.Namespace, progress: Callable[[str], None] = stderr) -> list[dict]:
    """Runs what ``args`` ask for, printing each benchmark's result as a JSON line (a suite's
    table last); returns the results."""
    from megatron_r1v.atomic_dir import check_writable
    from megatron_r1v.evaluate.runner import run_benchmark
    from megatron_r1v.rollout.sampling_runs import PROGRESS

    _check_arguments(args)
    plans, out = _plans(args)
    judge = _judge(args)
    for plan in plans:  # only now that nothing else can fail before the model loads
        check_writable(plan.out / PROGRESS, "--out")
    progress(f"output: {out}")
    generator = _load(args)
    results = []
    extra = {"model": str(args.model), "engine": args.engine}
    # An SGLang engine's processes outlive its Python object: stop them, also after a failure.
    with contextlib.ExitStack() as stack:
        if hasattr(generator.engine, "shutdown"):
            stack.callback(generator.engine.shutdown)
        progress(f"tiler: {generator.tiler_description}")
        for plan in plans:
            generator.check_items(plan.items)
        progress(f"checked {sum(len(p.items) for p in plans)} items: images decode, prompts fit the model")
        for plan in plans:
            results.append(run_benchmark(plan, generator, judge, progress, extra))
            print(json.dumps(results[-1]), flush=True)
    if args.suite is not None:
        print(json.dumps(_write_suite(out, args.suite, str(args.model), results)), flush=True)
        progress(f"table: {out / 'suite.md'}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_r1v.evaluate.judge import JudgeError

    args = _parser().parse_args(argv)
    try:
        evaluate_command(args)
    except (OSError, ValueError, KeyError, JudgeError) as err:  # a judge failing mid-run keeps what is done
        return user_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
