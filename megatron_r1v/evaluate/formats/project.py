"""The project's own prompt JSONL (``data/schema.py``, kind ``prompts``): {"id", "images",
"question", "answer", "answer_type", "choices"?}, the file GRPO trains on.

The schema's validation applies unchanged (its ``FILE:LINE: message`` problems become
this package's); image files are checked to exist, not decoded (the tilers decode them).
Items: the question as written (its own ``<image>`` placeholders or none), ``answers`` =
(answer,), ``answer_kind`` = ``answer_type`` (number, choice, expression or text),
``choices`` for choice questions, ``category`` = ``answer_type``.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_r1v.data.schema import PromptRecord, read_records
from megatron_r1v.evaluate.formats.tables import Reading
from megatron_r1v.evaluate.items import EvalItem


def read_project(path: Path, reading: Reading) -> list[EvalItem]:
    """The items of a prompts JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    # check_images=False: no decoding here; existence is checked below. read_records (not
    # load_records) returns every problem rather than raising on the first file-level summary,
    # so the schema's problems and missing images are listed together.
    records, problems = read_records(path, "prompts", check_images=False)
    found = [(problem.line, str(problem)) for problem in problems]
    if not records and not problems and not path.read_bytes().strip():
        reading.add(str(path), "empty file")
    lines = _record_lines(path)
    items = []
    for record in records:
        assert isinstance(record, PromptRecord)
        line = lines.get(record.id, 0)
        missing = [(i, image) for i, image in enumerate(record.images) if not image.is_file()]
        found.extend((line, f"{path}:{line}: images[{i}]: image {str(image)!r} of item {record.id!r} not found")
                     for i, image in missing)
        if not missing:
            items.append(EvalItem(id=record.id, question=record.question, images=record.images,
                                  answers=(record.answer,), answer_kind=record.answer_type,
                                  category=record.answer_type, source=f"{path}:{line}", choices=record.choices,
                                  raw_question=record.question))
    reading.problems.extend(message for _, message in sorted(found, key=lambda pair: pair[0]))
    return items


def _record_lines(path: Path) -> dict[str, int]:
    """Record id -> its line number (read_records keeps no positions; ids are unique in a
    valid file, and a file with problems is rejected anyway)."""
    lines: dict[str, int] = {}
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            obj = json.loads(raw)
        except ValueError:  # blank or malformed: read_records reported it already
            continue
        record_id = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(record_id, (str, int)) and not isinstance(record_id, bool):
            lines.setdefault(str(record_id), number)
    return lines
