"""OlympiadBench (He et al., 2024): the official JSON files (``OE_MM_maths_en_COMP.json``,
``OE_TO_physics_en_COMP.json``, ...) or their HF parquet.

Fields: ``id``, ``question``, ``solution``, ``final_answer`` (a list of strings, "$...$"
math), ``context`` (physics: the text the question builds on, or null), ``image_1`` ..
``image_5`` (a path relative to the file's folder or null; parquet: a struct with the
bytes), ``modality`` ("Multimodal" | "Text-only"), ``difficulty``,
``is_multiple_answer``, ``unit``, ``answer_type`` ("Numerical", "Expression", "Equation",
"Interval", "Tuple", "Need_human_evaluate"; comma-separated per answer for several),
``error`` (the accepted absolute error, a string or a number, comma-separated per answer,
or null), ``question_type`` ("Open-ended" | "Theorem proof"), ``subfield``, ``subject``
("Math" | "Physics"), ``language``. ``question_type``, ``modality`` and ``subject`` may be
left out when the file's name tells them (OE/TP, MM/TO, maths/physics).

Only open-ended questions with a final answer are evaluated; the others are skipped and
counted in one log line. ``<image_k>`` mentions become ``<image>`` placeholders when each
present image is mentioned exactly once (the images in mention order); with no mention
the images go before the text; otherwise "Image k: <image>" lines come first and the
mentions stay as text.

Prompt (OlympiadBench's instruction in our words): an open-ended problem from an
international {subject} competition, the answer's type, LaTeX for formulas, end with "So
the final answer is \\boxed{answer}.", the unit note when there is a unit; then the
context and the question.

Answers (the "$" delimiters removed): ``is_multiple_answer`` -> ``list``, the final answers
joined with ", "; else Numerical -> ``number``, other types -> ``expression``, each entry
of ``final_answer`` an acceptable answer. ``tolerance`` is the largest ``error`` given.
``category`` is ``f"{subject}_{modality}"`` lower-cased ("math_multimodal").
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

from megatron_r1v.data.images import ImageSource
from megatron_r1v.data.schema import IMAGE_PLACEHOLDER
from megatron_r1v.evaluate.formats.tables import (Fields, Reading, check_placeholders, is_number, read_rows,
                                                  strip_dollars, type_name)
from megatron_r1v.evaluate.items import EvalItem

logger = logging.getLogger(__name__)

REQUIRED = ("id", "question")
OPEN_ENDED, THEOREM_PROOF = "Open-ended", "Theorem proof"
QUESTION_TYPES = (OPEN_ENDED, THEOREM_PROOF)
MODALITIES = ("Multimodal", "Text-only")
SUBJECTS = {"Math": "mathematics", "Physics": "physics"}
IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, 6))
# The answer type's description in the prompt; "" where it would mislead (OlympiadBench's own
# prompt leaves out Tuple, whose meaning varies, and the types it grades by hand).
TYPE_TEXTS = {"Numerical": "a numerical value", "Expression": "an expression", "Equation": "an equation",
              "Interval": "an interval", "Tuple": "", "Need_human_evaluate": ""}
_FILE_RE = re.compile(r"(?P<qt>OE|TP)_(?P<mod>MM|TO)_(?P<subject>maths|physics)", re.IGNORECASE)
_FROM_FILE = {"OE": OPEN_ENDED, "TP": THEOREM_PROOF, "MM": "Multimodal", "TO": "Text-only",
              "MATHS": "Math", "PHYSICS": "Physics"}
_MENTION_RE = re.compile(r"<image_(\d+)>")


def read_olympiadbench(path: Path, reading: Reading) -> list[EvalItem]:
    """The open-ended items of OlympiadBench JSON or parquet files."""
    items: list[EvalItem] = []
    skipped = {"{} theorem-proof question(s)": 0, "{} question(s) without a final answer": 0}
    for row in read_rows(path, reading, REQUIRED):
        fields = Fields(row, reading)
        question_type = _labelled(fields, "question_type", tuple(QUESTION_TYPES), "qt")
        if question_type == THEOREM_PROOF:
            skipped["{} theorem-proof question(s)"] += 1
        elif question_type is not None and row.values.get("final_answer") in (None, [], ""):
            skipped["{} question(s) without a final answer"] += 1
        elif question_type is not None:
            item = _item(fields)
            if item is not None:
                items.append(item)
    if any(skipped.values()):
        logger.warning("%s: skipped %s (only open-ended questions with a final answer are scored)",
                       path, " and ".join(what.format(n) for what, n in skipped.items() if n))
    return items


def _labelled(fields: Fields, name: str, allowed: tuple[str, ...], group: str) -> Optional[str]:
    """A label field, else what the file's name says (OE_MM_maths_...)."""
    if name in fields.row.values:
        return fields.one_of(name, allowed)
    match = _FILE_RE.search(Path(fields.row.file).name)
    if match is None:
        fields.problem(name, "missing field (and the file's name has no OE|TP_MM|TO_maths|physics part)")
        return None
    return _FROM_FILE[match.group(group).upper()]


def _item(fields: Fields) -> Optional[EvalItem]:
    item_id = fields.item_id("id")
    fields.item = item_id
    question = fields.text("question")
    context = fields.text("context", optional=True, empty_ok=True)
    subject = _labelled(fields, "subject", tuple(SUBJECTS), "subject")
    modality = _labelled(fields, "modality", MODALITIES, "mod")
    multiple = fields.flag("is_multiple_answer")
    answer_types = _answer_types(fields)
    golds = _final_answers(fields)
    tolerance = _tolerance(fields)
    unit = fields.text("unit", optional=True, empty_ok=True) or None
    images = {int(column.rsplit("_", 1)[1]): fields.image(column) for column in IMAGE_COLUMNS
              if fields.given(column)}
    raw = "\n".join(t for t in (context, question) if t and t.strip())
    body, ordered = _place_images(fields, raw, images)
    if not fields.ok or None in (item_id, question, subject, modality, multiple, answer_types, golds, body):
        return None
    prompt = f"{_instruction(subject, answer_types, multiple, unit)}\n\n{body}"
    check_placeholders(fields, prompt, ordered)
    if not fields.ok:
        return None
    if multiple:
        answers, kind = (", ".join(golds),), "list"
    else:
        answers, kind = tuple(golds), "number" if answer_types == ["Numerical"] else "expression"
    return EvalItem(id=item_id, question=prompt, images=ordered, answers=answers, answer_kind=kind,
                    category=f"{subject}_{modality}".lower(), source=fields.row.location, unit=unit,
                    tolerance=tolerance if kind in ("number", "list") else None, raw_question=raw)


def _answer_types(fields: Fields) -> Optional[list[str]]:
    """``answer_type`` split per answer, a "-suffix" dropped ("Numerical-xxx" -> "Numerical")."""
    text = fields.text("answer_type")
    if text is None:
        return None
    types = [part.strip().split("-", 1)[0].strip() for part in text.split(",")]
    unknown = [t for t in types if t not in TYPE_TEXTS]
    if unknown:
        fields.problem("answer_type", f"unknown type(s) {', '.join(repr(t) for t in unknown)}; expected "
                                      f"{', '.join(TYPE_TEXTS)} (comma-separated for several answers)")
        return None
    return types


def _final_answers(fields: Fields) -> Optional[list[str]]:
    """``final_answer`` without its "$" delimiters (a lone string is taken as one answer)."""
    if isinstance(fields.row.values.get("final_answer"), str):
        one = fields.text("final_answer")
        texts = None if one is None else [one]
    else:
        texts = fields.text_list("final_answer")
    if texts is None:
        return None
    golds = [strip_dollars(t) for t in texts]
    if not all(golds):
        fields.problem("final_answer", f"an answer is empty once its $ delimiters are removed: {texts!r}")
        return None
    return golds


def _tolerance(fields: Fields) -> Optional[float]:
    """The largest value of ``error`` (null, a number, or numbers in a comma-separated string)."""
    value = fields.row.values.get("error")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [str(value)]
    elif isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
    else:
        fields.problem("error", f"expected a number or a string of numbers, got {type_name(value)}")
        return None
    if not all(is_number(part) and float(part) >= 0 for part in parts):
        fields.problem("error", f"expected non-negative numbers, got {value!r}")
        return None
    return max(float(part) for part in parts)


def _place_images(fields: Fields, text: str,
                  images: dict[int, Optional[ImageSource]]) -> tuple[Optional[str], tuple[ImageSource, ...]]:
    """The text with its image placeholders, and the images in placeholder order (module docstring)."""
    mentions = [int(k) for k in _MENTION_RE.findall(text)]
    for k in sorted(set(mentions) - set(images)):
        fields.problem(f"image_{k}", f"the question mentions <image_{k}> but image_{k} is "
                                     f"{'null' if f'image_{k}' in fields.row.values else 'not a field'}")
    if not fields.ok or any(image is None for image in images.values()):
        return None, ()
    present = {k: image for k, image in images.items() if image is not None}
    if not mentions:
        return text, tuple(present[k] for k in sorted(present))
    if sorted(mentions) == sorted(present):  # each image mentioned once: inline, in mention order
        return _MENTION_RE.sub(IMAGE_PLACEHOLDER, text), tuple(present[k] for k in mentions)
    lines = [f"Image {k}: {IMAGE_PLACEHOLDER}" for k in sorted(present)]
    return "\n".join(lines + [text]), tuple(present[k] for k in sorted(present))


def _instruction(subject: str, answer_types: list[str], multiple: bool, unit: Optional[str]) -> str:
    """OlympiadBench's instruction, in our words."""
    parts = [f"Here is an open-ended problem from an international {SUBJECTS[subject]} competition."]
    texts = [TYPE_TEXTS[t] for t in answer_types]
    if multiple and not all(texts):
        parts.append("The problem has several answers.")
    elif multiple and len(set(texts)) == 1:
        parts.append(f"The problem has several answers, each of them {texts[0]}.")
    elif multiple:
        parts.append(f"The problem has several answers, in order: {', '.join(texts)}.")
    elif texts[0]:
        parts.append(f"Its answer is {texts[0]}.")
    parts.append("Work it out from the information given, writing variables and formulas in LaTeX.")
    boxed = "the answers separated by commas" if multiple else "answer"
    parts.append(f"End your solution with \"So the final answer is \\boxed{{{boxed}}}.\" and state the result "
                 f"explicitly.")
    if unit:
        parts.append(f"The answer is in {unit}; leave the unit out of \\boxed{{}}.")
    return " ".join(parts)
