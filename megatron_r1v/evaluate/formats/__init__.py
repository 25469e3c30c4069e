"""Benchmark files in their public formats -> :class:`~megatron_r1v.evaluate.items.EvalItem`.

``read_benchmark(name, path)`` reads a LOCAL file (nothing is downloaded) of one of
:data:`BENCHMARKS`; each name has its module, whose docstring says which public release
and fields it follows and which prompt it builds:

- ``mathvista``: MathVista testmini, the official ``testmini.json`` or the HF parquet;
- ``mmmu``: MMMU validation / dev parquet, a file, a folder of them or a glob pattern;
- ``mathverse``: MathVerse testmini, the official ``testmini.json`` or the HF parquet;
- ``olympiadbench``: OlympiadBench JSON or parquet (open-ended questions only);
- ``aime``: AIME-style text problems, JSON Lines / JSON / parquet;
- ``pope``: yes/no hallucination questions in POPE's format, parquet or JSON Lines;
- ``project``: the project's prompts JSONL (``data/schema.py``).

Containers (``formats.tables``): ``.json`` (a list of objects or an object of objects),
``.jsonl``, ``.parquet`` with images as HF ``datasets`` stores them (bytes kept in memory
as ``EmbeddedImage``, never written to temporary files), a folder (its parquet files, in
sorted order) or a glob pattern (its matches in sorted order, e.g. MMMU's
``MMMU/*/validation-*.parquet`` or OlympiadBench's ``data/OE_*.json``).

A file is read to its end and every problem is listed in one :class:`BenchmarkDataError`
(``FILE:LINE: message`` or ``FILE:row N: column: message``), duplicate ids included.
Image files are checked to exist; decoding them is left to the tilers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

from megatron_r1v.evaluate.formats import aime, mathverse, mathvista, mmmu, olympiadbench, pope, project
from megatron_r1v.evaluate.formats.tables import BenchmarkDataError, Reading
from megatron_r1v.evaluate.items import EvalItem

BENCHMARKS: tuple[str, ...] = ("mathvista", "mmmu", "mathverse", "olympiadbench", "aime", "pope", "project")

_READERS: dict[str, Callable[[Path, Reading], list[EvalItem]]] = {
    "mathvista": mathvista.read_mathvista,
    "mmmu": mmmu.read_mmmu,
    "mathverse": mathverse.read_mathverse,
    "olympiadbench": olympiadbench.read_olympiadbench,
    "aime": aime.read_aime,
    "pope": pope.read_pope,
    "project": project.read_project,
}

__all__ = ["BENCHMARKS", "BenchmarkDataError", "read_benchmark"]


def read_benchmark(name: str, path: Union[str, "os.PathLike[str]"], *, limit: Optional[int] = None) -> list[EvalItem]:
    """The items of benchmark ``name`` in ``path``, in file order; the first ``limit`` with one.

    The whole file is validated even with ``limit`` (a problem further down is reported
    now, not in the next, longer run). Raises ValueError for an unknown ``name`` or a bad
    ``limit``, FileNotFoundError for a missing file or folder, and
    :class:`BenchmarkDataError` listing every problem, or when no item is left to evaluate.
    """
    if name not in _READERS:
        raise ValueError(f"--benchmark: unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit: expected a positive number of items, got {limit!r}")
    reading = Reading()
    items = _READERS[name](Path(path), reading)
    _check_unique_ids(items, reading)
    if reading.problems:
        raise BenchmarkDataError.listing(f"{path} (--benchmark {name})", reading.problems)
    if not items:
        raise BenchmarkDataError(f"{path}: no {name} items to evaluate")
    return items[:limit] if limit is not None else items


def _check_unique_ids(items: list[EvalItem], reading: Reading) -> None:
    first_source: dict[str, str] = {}
    for item in items:
        if item.id in first_source:
            reading.add(item.source, f"duplicate id {item.id!r} (first at {first_source[item.id]})")
        else:
            first_source[item.id] = item.source
