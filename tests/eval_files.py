"""Small benchmark files in their public formats, for the tests of ``evaluate`` (formats, runner, suite).

Import as ``from eval_files import write_mathvista_json`` (tests/ is on sys.path, pytest.ini:
pythonpath). Every ``write_*(folder, ...)`` creates ``folder`` (and the files beside the
data file that the format names, e.g. ``images/``) and returns a :class:`Written`: the data
file's path and, per item id in file order, what ``read_benchmark`` should give: the gold
answers, the answer kind, the category, the choices, and the images (the PIL originals and
the encoded bytes written, in the item's image order). Images are real encoded files (PNG,
POPE's JPEG) of ``IMAGE_SIZE`` pixels made with PIL; parquet cells hold them as HF
``datasets`` does, a struct ``{"bytes", "path"}``.

    write_mathvista_json(folder, n, with_query=True)      testmini.json + images/
    write_mathvista_parquet(folder, n)                    testmini parquet, decoded_image bytes
    write_mmmu_parquet(folder, n_choice, n_open, subject="Art_Theory", split="validation")
                                                          folder/<subject>/<split>-00000-of-00001.parquet
    write_mathverse_json(folder, n)                       testmini.json + images_version_1-4/
    write_mathverse_parquet(folder, n)                    testmini parquet, image bytes
    write_olympiadbench_json(folder, n, name=..., labels=True)   OE_MM_maths_en_COMP.json + images/
    write_olympiadbench_parquet(folder, n, name=...)      the same rows, image bytes
    write_aime_jsonl(folder, n)                           Maxwell-Jia/AIME_2024's fields
    write_pope_parquet(folder, n)                         lmms-lab/POPE, JPEG bytes, 3 rows per image
    write_project_jsonl(folder, n)                        the project's prompts JSONL + images/
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

IMAGE_SIZE = (64, 48)
"""(width, height) of every image written."""


@dataclass
class Written:
    """A benchmark file written, and what reading it should give (keys: item ids, in file order)."""

    path: Path
    answers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)
    choices: dict[str, Optional[tuple[str, ...]]] = field(default_factory=dict)
    images: dict[str, tuple[Image.Image, ...]] = field(default_factory=dict)
    """The RGB originals, in the order of ``EvalItem.images``."""
    encoded: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    """The encoded bytes written (file or parquet cell), in the same order."""
    skipped: int = 0
    """Records written that the reader skips (OlympiadBench theorem proofs)."""

    def add(self, item_id: str, answers: tuple[str, ...], kind: str, category: str,
            choices: Optional[tuple[str, ...]] = None, images: tuple[Image.Image, ...] = (),
            encoded: tuple[bytes, ...] = ()) -> None:
        self.answers[item_id], self.kinds[item_id], self.categories[item_id] = answers, kind, category
        self.choices[item_id], self.images[item_id], self.encoded[item_id] = choices, images, encoded


def make_image(seed: int, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """A deterministic RGB noise image (every pixel differs from its neighbours, so a wrong
    decode or a swapped image shows)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _save(folder: Path, relative: str, image: Image.Image) -> bytes:
    """Writes ``image`` as PNG at ``folder/relative``; returns the bytes written."""
    data = encode(image)
    (folder / relative).parent.mkdir(parents=True, exist_ok=True)
    (folder / relative).write_bytes(data)
    return data


def _cell(data: bytes, name: str) -> dict:
    """An HF ``datasets`` image cell."""
    return {"bytes": data, "path": name}


def _write_parquet(path: Path, rows: list[dict], types: dict[str, Any]) -> Path:
    """``rows`` as a parquet file; ``types`` gives the arrow type of the columns pyarrow
    cannot infer from values that may be null (images, lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    arrays = [pa.array([row[c] for row in rows], type=types.get(c)) for c in columns]
    pq.write_table(pa.Table.from_arrays(arrays, names=columns), path)
    return path


def _image_type() -> Any:
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=4, ensure_ascii=False), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- MathVista ----------------------------------------------------------------------------

_MATHVISTA_CHOICES = ["3", "5", "7", "9"]
# (question_type, answer_type, answer, precision, unit): the five kinds of testmini records.
_MATHVISTA_KINDS = [
    ("multi_choice", "text", None, None, None),
    ("free_form", "integer", "12", None, None),
    ("free_form", "float", "1.5", 1.0, None),
    ("free_form", "float", "0.25", 2.0, "cm"),
    ("free_form", "list", "[1, 2]", None, None),
    ("free_form", "text", "red", None, None),
]


def _mathvista_records(n: int, with_query: bool) -> list[dict]:
    """Record i cycles through :data:`_MATHVISTA_KINDS`; its multi_choice answer is option i % 4."""
    records = []
    for i in range(n):
        pid = str(i + 1)
        question_type, answer_type, answer, precision, unit = _MATHVISTA_KINDS[i % len(_MATHVISTA_KINDS)]
        choices = list(_MATHVISTA_CHOICES) if question_type == "multi_choice" else None
        answer = choices[i % 4] if choices else answer
        question = f"How many objects are in the picture {pid}?"
        query = f"Hint: Please answer the question. (record {pid})\nQuestion: {question}" if with_query else None
        records.append({
            "pid": pid, "question": question, "image": f"images/{pid}.png", "choices": choices, "unit": unit,
            "precision": precision, "answer": answer, "question_type": question_type, "answer_type": answer_type,
            "metadata": {"split": "testmini", "source": "synthetic", "task": "figure question answering"},
            "query": query,
        })
    return records


def _mathvista_written(path: Path, records: list[dict], encoded: list[bytes]) -> Written:
    written = Written(path)
    for i, record in enumerate(records):
        is_choice = record["question_type"] == "multi_choice"
        kind = "choice" if is_choice else {"integer": "number", "float": "number"}.get(record["answer_type"],
                                                                                       record["answer_type"])
        answer = "ABCD"[_MATHVISTA_CHOICES.index(record["answer"])] if is_choice else record["answer"]
        written.add(record["pid"], (answer,), kind, record["question_type"],
                    tuple(record["choices"]) if is_choice else None, (make_image(i),), (encoded[i],))
    return written


def write_mathvista_json(folder: Path, n: int, with_query: bool = True) -> Written:
    """The official layout: ``testmini.json`` (an object keyed by pid) and ``images/<pid>.png``.
    Without ``with_query`` the records have ``query`` null, so the reader builds the hint."""
    records = _mathvista_records(n, with_query)
    encoded = [_save(folder, record["image"], make_image(i)) for i, record in enumerate(records)]
    path = _write_json(folder / "testmini.json", {record["pid"]: record for record in records})
    return _mathvista_written(path, records, encoded)


def write_mathvista_parquet(folder: Path, n: int) -> Written:
    """``AI4Math/MathVista``'s testmini parquet: the JSON's columns plus ``decoded_image``
    (PNG bytes); the ``image`` paths name files that do not exist, as in the download."""
    import pyarrow as pa

    records = _mathvista_records(n, with_query=True)
    encoded = [encode(make_image(i)) for i in range(n)]
    for record, data in zip(records, encoded):
        record["decoded_image"] = _cell(data, record["image"])
    types = {"decoded_image": _image_type(), "choices": pa.list_(pa.string()), "unit": pa.string(),
             "precision": pa.float64(), "query": pa.string()}
    path = _write_parquet(folder / "testmini-00000-of-00001.parquet", records, types)
    return _mathvista_written(path, records, encoded)


# --- MMMU ---------------------------------------------------------------------------------

_MMMU_OPTIONS = ["a circle", "a square", "a triangle", "a star"]
# (answer cell, golds, kind) of the open questions, in turn.
_MMMU_OPEN = [("42", ("42",), "number"), ("['24/7', '3.429']", ("24/7", "3.429"), "expression"),
              ("Impressionism", ("Impressionism",), "text")]


def write_mmmu_parquet(folder: Path, n_choice: int, n_open: int, subject: str = "Art_Theory",
                       split: str = "validation") -> Written:
    """``MMMU/MMMU``'s layout: ``folder/<subject>/<split>-00000-of-00001.parquet``, first
    ``n_choice`` multiple-choice questions (answer option i % 4; the first has two images,
    image_1 and image_2, both mentioned), then ``n_open`` open ones cycling a number, a list
    literal of two answers and a word. The ids are ``<split>_<subject>_<k>``, k from 1."""
    rows, written = [], Written(folder / subject / f"{split}-00000-of-00001.parquet")
    for i in range(n_choice + n_open):
        item_id = f"{split}_{subject}_{i + 1}"
        count = 2 if i == 0 and n_choice else 1
        originals = tuple(make_image(1000 * i + k) for k in range(count))
        encoded = tuple(encode(image) for image in originals)
        mentions = " and ".join(f"<image {k + 1}>" for k in range(count))
        row = {"id": item_id, "question": f"What is shown in {mentions}?", "explanation": "",
               "img_type": "['Diagrams']", "topic_difficulty": "Easy", "subfield": "Drawing"}
        for k in range(7):
            row[f"image_{k + 1}"] = _cell(encoded[k], f"{item_id}_{k + 1}.png") if k < count else None
        if i < n_choice:
            letter = "ABCD"[i % 4]
            row.update(options=str(_MMMU_OPTIONS), answer=letter, question_type="multiple-choice")
            written.add(item_id, (letter,), "choice", subject, tuple(_MMMU_OPTIONS), originals, encoded)
        else:
            answer, golds, kind = _MMMU_OPEN[(i - n_choice) % len(_MMMU_OPEN)]
            row.update(options="[]", answer=answer, question_type="open")
            written.add(item_id, golds, kind, subject, None, originals, encoded)
        rows.append(row)
    _write_parquet(written.path, rows, {f"image_{k}": _image_type() for k in range(1, 8)})
    return written


# --- MathVerse ----------------------------------------------------------------------------

_COT = "According to the question shown in the image, please first conduct reasoning, and then answer the question"
_COT_CHOICE = " and provide the correct option letter, e.g., A, B, C, D, at the end."
# (problem_version, question_type, question, answer, choices the reader should find, kind).
_MATHVERSE_KINDS = [
    ("Text Dominant", "multi-choice", "In the triangle, find angle B.\nChoices:\nA:30°\nB:45°\nC:60°\nD:90°", "C",
     ("30°", "45°", "60°", "90°"), "choice"),
    ("Vision Only", "multi-choice", "", "B", ("A", "B", "C", "D", "E"), "choice"),
    ("Text Only", "free-form", "A square has area 25. Find its side.", "5", None, "number"),
    ("Vision Intensive", "free-form", "Find the ratio of the shaded area.", "\\frac{1}{2}", None, "expression"),
]


def _mathverse_records(n: int) -> list[dict]:
    records = []
    for i in range(n):
        version, question_type, question, answer, _, _ = _MATHVERSE_KINDS[i % len(_MATHVERSE_KINDS)]
        image = "" if version == "Text Only" else f"images_version_1-4/image_{i + 1}.png"
        records.append({
            "sample_index": str(i + 1), "problem_index": str(i // 2 + 1), "problem_version": version,
            "question": question, "image": image, "answer": answer, "question_type": question_type,
            "metadata": {"split": "testmini", "source": "synthetic", "subject": "Plane Geometry",
                         "subfield": "Angle"},
            "query_wo": question,
            "query_cot": _COT + (_COT_CHOICE if question_type == "multi-choice" else ".")
            + ("\nQuestion: " + question if question else ""),
            "question_for_eval": question,
        })
    return records


def _mathverse_written(path: Path, records: list[dict], encoded: dict[int, bytes]) -> Written:
    written = Written(path)
    for i, record in enumerate(records):
        _, _, _, answer, choices, kind = _MATHVERSE_KINDS[i % len(_MATHVERSE_KINDS)]
        has_image = i in encoded
        written.add(record["sample_index"], (answer,), kind, record["problem_version"], choices,
                    (make_image(i),) if has_image else (), (encoded[i],) if has_image else ())
    return written


def write_mathverse_json(folder: Path, n: int) -> Written:
    """The official layout: ``testmini.json`` (a list) and ``images_version_1-4/``; records
    cycle a Text Dominant multiple choice (options in the question), a Vision Only one
    (empty question: choices are the letters A-E), a Text Only free-form number (no image)
    and a Vision Intensive expression."""
    records = _mathverse_records(n)
    encoded = {i: _save(folder, record["image"], make_image(i)) for i, record in enumerate(records) if record["image"]}
    return _mathverse_written(_write_json(folder / "testmini.json", records), records, encoded)


def write_mathverse_parquet(folder: Path, n: int) -> Written:
    """``AI4Math/MathVerse`` testmini parquet: the same records, ``image`` a struct with PNG
    bytes (null for Text Only)."""
    records = _mathverse_records(n)
    encoded = {i: encode(make_image(i)) for i, record in enumerate(records) if record["image"]}
    for i, record in enumerate(records):
        record["image"] = _cell(encoded[i], record["image"]) if i in encoded else None
    path = _write_parquet(folder / "testmini-00000-of-00001.parquet", records, {"image": _image_type()})
    return _mathverse_written(path, records, encoded)


# --- OlympiadBench ------------------------------------------------------------------------


def _olympiad_records(n: int, physics: bool, modality: str) -> list[tuple[dict, int, tuple[str, ...], str]]:
    """(record, number of images, golds, kind) cycling: a numerical answer with an error
    and one mentioned image; an expression with an unmentioned image; two numerical answers
    with two images mentioned in reverse order; a theorem proof (skipped)."""
    out = []
    for i in range(n):
        base = {"id": (3000 if physics else 2000) + i, "subfield": "Geometry", "context": None,
                "solution": ["Because ..."],
                "is_multiple_answer": False, "unit": "m/s" if physics else None, "answer_type": "Numerical",
                "error": None, "question_type": "Open-ended", "subject": "Physics" if physics else "Math",
                "language": "English", "modality": modality, "difficulty": "Competition"}
        shape = i % 4
        if shape == 0:
            base.update(question="In <image_1>, find the length.", final_answer=["$3.14$"], error="0.01")
            out.append((base, 1, ("3.14",), "number"))
        elif shape == 1:
            base.update(question="Find the height of the figure.", final_answer=["$\\frac{\\sqrt{3}}{2}$"],
                        answer_type="Expression")
            out.append((base, 1, ("\\frac{\\sqrt{3}}{2}",), "expression"))
        elif shape == 2:
            base.update(question="Compare <image_2> with <image_1>; find both roots.", final_answer=["$1$", "$2$"],
                        is_multiple_answer=True, answer_type="Numerical")
            out.append((base, 2, ("1, 2",), "list"))
        else:
            base.update(question="Prove that the sum is even.", final_answer=None, question_type="Theorem proof",
                        answer_type=None)
            out.append((base, 0, (), ""))
    return out


def _olympiad_write(folder: Path, n: int, name: str, embed: bool, labels: bool) -> tuple[Written, list[dict]]:
    physics, modality = "physics" in name, "Text-only" if "_TO_" in name else "Multimodal"
    written, records = Written(folder / name), []
    for i, (record, count, golds, kind) in enumerate(_olympiad_records(n, physics, modality)):
        originals = tuple(make_image(100 * i + k) for k in range(count))
        encoded = []
        for k in range(5):
            relative = f"images/{record['id']}_{k + 1}.png"
            if k < count:
                data = encode(originals[k]) if embed else _save(folder, relative, originals[k])
                encoded.append(data)
                record[f"image_{k + 1}"] = _cell(data, relative) if embed else relative
            else:
                record[f"image_{k + 1}"] = None
        if not labels:
            for key in ("question_type", "subject", "modality"):
                del record[key]
        records.append(record)
        if not kind:
            written.skipped += 1
            continue
        order = (1, 0) if count == 2 else tuple(range(count))  # the reverse mention order of shape 2
        category = f"{'physics' if physics else 'math'}_{modality}".lower()
        written.add(str(record["id"]), golds, kind, category, None, tuple(originals[k] for k in order),
                    tuple(encoded[k] for k in order))
    return written, records


def write_olympiadbench_json(folder: Path, n: int, name: str = "OE_MM_maths_en_COMP.json",
                             labels: bool = True) -> Written:
    """An official-style JSON list ``folder/name`` with images in ``folder/images/``
    (:func:`_olympiad_records` has the cycle; one in four is a skipped theorem proof).
    ``labels=False`` leaves out question_type / subject / modality (the name tells them);
    a name with "physics" gives physics records with unit "m/s"."""
    written, records = _olympiad_write(folder, n, name, embed=False, labels=labels)
    _write_json(written.path, records)
    return written


def write_olympiadbench_parquet(folder: Path, n: int, name: str = "OE_MM_maths_en_COMP.parquet") -> Written:
    """The same records as a parquet file, ``image_k`` structs with PNG bytes."""
    import pyarrow as pa

    written, records = _olympiad_write(folder, n, name, embed=True, labels=True)
    types = {f"image_{k}": _image_type() for k in range(1, 6)}
    types.update(context=pa.string(), unit=pa.string(), error=pa.string(), answer_type=pa.string(),
                 final_answer=pa.list_(pa.string()))
    _write_parquet(written.path, records, types)
    return written


# --- AIME, POPE, project --------------------------------------------------------------------


def write_aime_jsonl(folder: Path, n: int) -> Written:
    """``Maxwell-Jia/AIME_2024``'s fields as JSON Lines: {ID "2024-I-k", Problem, Solution,
    Answer (an integer)}; item k's answer is 100 + k."""
    written, rows = Written(folder / "aime_2024.jsonl"), []
    for k in range(1, n + 1):
        rows.append({"ID": f"2024-I-{k}", "Problem": f"Find the remainder when {k}^{k} is divided by 1000.",
                     "Solution": "Compute it.", "Answer": 100 + k})
        written.add(f"2024-I-{k}", (str(100 + k),), "number", "2024")
    _write_jsonl(written.path, rows)
    return written


_POPE_CATEGORIES = ("adversarial", "popular", "random")


def write_pope_parquet(folder: Path, n: int) -> Written:
    """``lmms-lab/POPE``'s columns: id "0".., question_id, question, answer (yes for even
    rows), image_source, image (JPEG bytes, one image per 3 rows as POPE asks several
    questions of each image), category cycling adversarial / popular / random."""
    written, rows = Written(folder / "test-00000-of-00001.parquet"), []
    for i in range(n):
        image = make_image(i // 3)
        data = encode(image, "JPEG")
        answer, category = "yes" if i % 2 == 0 else "no", _POPE_CATEGORIES[i % 3]
        rows.append({"id": str(i), "question_id": str(i // 3 + 1), "question": f"Is there a cat in the image {i}?",
                     "answer": answer, "image_source": f"COCO_val2014_{i // 3:012d}", "image": _cell(data, None),
                     "category": category})
        written.add(str(i), (answer,), "yes_no", category, None, (image,), (data,))
    _write_parquet(written.path, rows, {"image": _image_type()})
    return written


def write_project_jsonl(folder: Path, n: int) -> Written:
    """The project's prompts JSONL with ``images/<k>.png``: even records a number question
    with an ``<image>`` placeholder, odd ones a choice question (answer "B")."""
    written, rows = Written(folder / "prompts.jsonl"), []
    for k in range(n):
        image = make_image(k)
        data = _save(folder, f"images/{k}.png", image)
        if k % 2 == 0:
            rows.append({"id": k, "images": [f"images/{k}.png"], "question": "<image>\nHow many dots?",
                         "answer": str(k + 1), "answer_type": "number"})
            written.add(str(k), (str(k + 1),), "number", "number", None, (image,), (data,))
        else:
            rows.append({"id": k, "images": [f"images/{k}.png"], "question": "Which colour?\nA. red\nB. blue",
                         "answer": "B", "answer_type": "choice", "choices": ["red", "blue"]})
            written.add(str(k), ("B",), "choice", "choice", ("red", "blue"), (image,), (data,))
    _write_jsonl(written.path, rows)
    return written
