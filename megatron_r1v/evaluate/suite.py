"""A suite: several benchmarks of one model in one command, one table.

A suite file is YAML (``examples/eval/*.yaml``)::

    samples: 5                 # defaults for every benchmark: samples, temperature, top_p,
    max_new_tokens: 64000      # repetition_penalty, max_new_tokens, batch_size, seed
    benchmarks:
      - name: MathVista        # the row's label (default: the benchmark name); unique
        benchmark: mathvista   # a name of evaluate.formats.BENCHMARKS
        data: MathVista/testmini.json   # relative to the suite file's folder
        limit: 100             # optional: the first N items
        samples: 1             # optional: any default above, for this benchmark

A sampling value given on the command line overrides the file's (for a quick check of a
long suite: ``--samples 1 --limit 20``). Every benchmark file is read and validated, and
every output folder checked, before the model is loaded; the model is loaded once. Each
benchmark runs in its own resumable folder ``OUT/<name>/`` (``evaluate.runner``); the
table goes to ``OUT/suite.md`` and ``OUT/suite.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence

SAMPLING_KEYS = ("samples", "temperature", "top_p", "repetition_penalty", "max_new_tokens", "batch_size", "seed")
_ENTRY_KEYS = ("name", "benchmark", "data", "limit", *SAMPLING_KEYS)


@dataclass(frozen=True)
class SuiteEntry:
    name: str
    benchmark: str
    data: Path
    limit: Optional[int]
    sampling: dict
    """The file's sampling values for this benchmark (its own over the file's defaults)."""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "benchmark"


def _check_keys(where: str, obj: Any, allowed: Sequence[str]) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")


def _entry(path: Path, index: int, raw: Any, defaults: dict) -> SuiteEntry:
    from megatron_r1v.evaluate.formats import BENCHMARKS

    where = f"{path}: benchmarks[{index}]"
    _check_keys(where, raw, _ENTRY_KEYS)
    for key in ("benchmark", "data"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"{where}: '{key}' must be a non-empty string")
    if raw["benchmark"] not in BENCHMARKS:
        raise ValueError(f"{where}: benchmark {raw['benchmark']!r} is not one of {', '.join(BENCHMARKS)}")
    limit = raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"{where}: 'limit' must be an integer >= 1, got {limit!r}")
    name = raw.get("name", raw["benchmark"])
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: 'name' must be a non-empty string")
    data = Path(raw["data"]) if Path(raw["data"]).is_absolute() else path.parent / raw["data"]
    sampling = {**defaults, **{k: raw[k] for k in SAMPLING_KEYS if k in raw}}
    return SuiteEntry(name.strip(), raw["benchmark"], data, limit, sampling)


def load_suite(path: Path) -> list[SuiteEntry]:
    """The entries of a suite file; ValueError naming the file and the entry for anything wrong."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--suite {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    _check_keys(str(path), raw, ("benchmarks", *SAMPLING_KEYS))
    benchmarks = raw.get("benchmarks")
    if not isinstance(benchmarks, list) or not benchmarks:
        raise ValueError(f"{path}: 'benchmarks' must be a non-empty list")
    defaults = {k: raw[k] for k in SAMPLING_KEYS if k in raw}
    entries = [_entry(path, i, b, defaults) for i, b in enumerate(benchmarks)]
    slugs = [_slug(e.name) for e in entries]
    repeated = sorted({s for s in slugs if slugs.count(s) > 1})
    if repeated:
        raise ValueError(f"{path}: benchmark names must be unique (as folder names); repeated: {repeated}")
    return entries


def entry_folder(out: Path, entry: SuiteEntry) -> Path:
    return out / _slug(entry.name)


def sampling_for(entry: SuiteEntry, overrides: dict) -> Any:
    """``SamplingSettings`` of an entry: the command line's explicit values over the file's."""
    from megatron_r1v.evaluate.runner import SamplingSettings

    known = {f.name for f in fields(SamplingSettings)}
    values = {**entry.sampling, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return SamplingSettings(**{k: v for k, v in values.items() if k in known})
    except ValueError as err:
        raise ValueError(f"suite benchmark {entry.name!r}: {err}") from None


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}"


def table_row(result: dict) -> dict:
    """One row of the suite table (``suite.json``'s entries)."""
    row = {key: result[key] for key in ("name", "benchmark", "num_items", "k", "pass@1", "pass@k", "format",
                                        "truncation_rate")}
    row.update(mean_tokens=result["lengths"]["mean_tokens"], p90_tokens=result["lengths"]["p90_tokens"])
    if "hallucination" in result:
        row["hallucination_rate"] = result["hallucination"]["hallucination_rate"]
    return row


def markdown_table(rows: Sequence[dict], model: str) -> str:
    """The suite table in Markdown, percentages with one decimal."""
    lines = [f"Model: `{model}`", "",
             "| Benchmark | Items | k | pass@1 (%) | pass@k (%) | Mean tokens | P90 tokens | Truncated (%) | "
             "Format (%) | Hallucination (%) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['num_items']} | {r['k']} | {_percent(r['pass@1'])} | "
                     f"{_percent(r['pass@k'])} | {_number(r['mean_tokens'])} | {_number(r['p90_tokens'])} | "
                     f"{_percent(r['truncation_rate'])} | {_percent(r['format'])} | "
                     f"{_percent(r.get('hallucination_rate'))} |")
    return "\n".join(lines) + "\n"
