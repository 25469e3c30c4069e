"""A prompts JSONL written out in public benchmark formats, with a suite file to evaluate them.

    python tools/export_benchmark_formats.py --prompts DIR/prompts.jsonl --out OUT

Writes (the folder appears complete or not at all):

* ``OUT/mathvista/testmini.json`` + ``OUT/mathvista/images/``: MathVista's testmini layout
  (a JSON object of pid -> {pid, question, image, choices, unit, precision, answer,
  question_type, answer_type, metadata, query}); a ``choice`` record becomes a
  ``multi_choice`` question whose answer is the option's text, a ``number`` one a
  ``free_form`` integer (or float with its precision), ``text`` and ``expression`` ones
  ``free_form`` text; ``query`` carries MathVista's hint for its type;
* ``OUT/mmmu/validation-00000-of-00001.parquet``: MMMU's validation parquet (id
  ``validation_<Task>_<n>``, question with ``<image k>`` references, options as a Python list
  literal, image_1..image_7 as ``{bytes, path}`` structs with the PNG/JPEG bytes embedded,
  answer, question_type ``multiple-choice`` or ``open``);
* ``OUT/suite.yaml``: the project file and both exports as one ``--suite``.

The task of a record (``Color``, ``Count``...) comes from ``metadata.jsonl`` beside the
prompts when there is one, else from its answer type. Used by ``examples/quickstart.sh`` to
run its held-out split through the public readers; also a way to share an evaluation set
in a format other tools read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

MAX_MMMU_IMAGES = 7


def _bare_question(question: str) -> str:
    """The question without the project's ``<image>`` placeholders (public formats keep images apart)."""
    from megatron_r1v.data.schema import IMAGE_PLACEHOLDER

    return "\n".join(line for line in question.replace(IMAGE_PLACEHOLDER, "\n").split("\n") if line.strip())


def _tasks(prompts: Path) -> dict[str, str]:
    meta = prompts.parent / "metadata.jsonl"
    if not meta.is_file():
        return {}
    rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {str(row["id"]): str(row["task"]) for row in rows if "id" in row and "task" in row}


def _number_type(answer: str) -> tuple[str, Optional[int]]:
    """MathVista's (answer_type, precision) of a number answer."""
    if "." not in answer:
        return "integer", None
    return "float", len(answer.split(".", 1)[1])


def mathvista_record(record: Any, image_name: str, task: str) -> dict:
    """MathVista testmini's fields for one project record (one image)."""
    from megatron_r1v.evaluate.formats.mathvista import build_query

    question = _bare_question(record.question)
    precision = None
    if record.answer_type == "choice":
        question_type, answer_type = "multi_choice", "text"
        answer = record.choices[ord(record.answer) - 65]
    elif record.answer_type == "number":
        question_type, (answer_type, precision) = "free_form", _number_type(record.answer)
        answer = record.answer
    else:
        question_type, answer_type, answer = "free_form", "text", record.answer
    choices = list(record.choices) if record.choices else None
    return {"pid": record.id, "question": question, "image": f"images/{image_name}", "choices": choices,
            "unit": None, "precision": None if precision is None else float(precision), "answer": answer,
            "question_type": question_type, "answer_type": answer_type,
            "metadata": {"split": "testmini", "source": "megatron-r1v", "task": task},
            "query": build_query(question, question_type, answer_type, precision, None, choices)}


def mmmu_row(record: Any, index: int, task: str) -> dict:
    """MMMU validation's columns for one project record (images embedded)."""
    images = [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in record.images]
    refs = " ".join(f"<image {k + 1}>" for k in range(len(images)))
    question = f"{refs} {_bare_question(record.question)}".strip()
    is_choice = record.answer_type == "choice"
    row = {"id": f"validation_{task.capitalize()}_{index + 1}", "question": question,
           "options": repr(list(record.choices or [])) if is_choice else "[]", "explanation": "",
           "img_type": "['Synthetic']", "answer": record.answer, "topic_difficulty": "Easy",
           "question_type": "multiple-choice" if is_choice else "open", "subfield": task}
    for k in range(MAX_MMMU_IMAGES):
        row[f"image_{k + 1}"] = images[k] if k < len(images) else None
    return row


def _write_mmmu(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    text_columns = ["id", "question", "options", "explanation", "img_type", "answer", "topic_difficulty",
                    "question_type", "subfield"]
    schema = pa.schema([(c, pa.string()) for c in text_columns[:3]] + [(f"image_{k + 1}", image) for k in
                                                                        range(MAX_MMMU_IMAGES)]
                       + [(c, pa.string()) for c in text_columns[3:]])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def export(prompts: Path, out: Path) -> dict:
    """Writes the exports of ``prompts`` into ``out`` (atomically); returns the counts."""
    from megatron_r1v.atomic_dir import atomic_directory
    from megatron_r1v.data.schema import load_records

    records = load_records(prompts, "prompts").records
    too_many = [r.id for r in records if len(r.images) != 1]
    if too_many:
        raise ValueError(f"{prompts}: MathVista items have exactly one image; records {too_many[:5]} have another "
                         "number")
    tasks = _tasks(prompts)
    with atomic_directory(out) as tmp:
        (tmp / "mathvista" / "images").mkdir(parents=True)
        mathvista = {}
        for record in records:
            name = f"{record.id}{record.images[0].suffix}"
            shutil.copyfile(record.images[0], tmp / "mathvista" / "images" / name)
            mathvista[record.id] = mathvista_record(record, name, tasks.get(record.id, record.answer_type))
        (tmp / "mathvista" / "testmini.json").write_text(json.dumps(mathvista, indent=1) + "\n", encoding="utf-8")
        (tmp / "mmmu").mkdir()
        _write_mmmu([mmmu_row(r, i, tasks.get(r.id, r.answer_type)) for i, r in enumerate(records)],
                    tmp / "mmmu" / "validation-00000-of-00001.parquet")
        (tmp / "suite.yaml").write_text(
            "# python -m megatron_r1v.evaluate --suite suite.yaml --model HF_DIR\n"
            "benchmarks:\n"
            f"  - {{name: project, benchmark: project, data: {json.dumps(str(prompts.resolve()))}}}\n"
            "  - {name: MathVista-format, benchmark: mathvista, data: mathvista/testmini.json}\n"
            "  - {name: MMMU-format, benchmark: mmmu, data: mmmu/validation-00000-of-00001.parquet}\n",
            encoding="utf-8")
    return {"records": len(records), "out": str(out)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", required=True, type=Path, help="prompts JSONL (data/schema.py)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (replaced)")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(export(args.prompts, args.out)))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
