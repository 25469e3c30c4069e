"""MMMU (Yue et al., 2024) validation / dev: the HF parquet ``MMMU/MMMU``, one file per
subject (``<Subject>/validation-00000-of-00001.parquet``); a folder of them or a glob
pattern such as ``MMMU/*/dev-*.parquet`` reads several. A folder holding validation files
(the download's root, beside dev and test files) is read as its validation split, the
split the reports score ("MMMU (val)").

Columns: ``id`` ("validation_Art_Theory_12"), ``question``, ``options`` (a string holding
a Python list literal, "['A cat', 'B dog']", or "[]" for open questions; a real list is
accepted too), ``explanation``, ``image_1`` .. ``image_7`` (struct ``{bytes, path}`` or
null), ``img_type``, ``answer`` ("A" for multiple choice; for open questions a string,
sometimes a list literal of several acceptable answers "['24/7', '3.429']"),
``topic_difficulty``, ``question_type`` ("multiple-choice" | "open"), ``subfield``. The
test split, whose answers are hidden ("?"), cannot be scored and is rejected.

Prompt: the present images first, in column order ("<image>" alone for one image,
"Image k: <image>" lines for several, so the text's ``<image k>`` mentions make sense),
then "Question: ...", for multiple choice the options as "A. ..." lines and "Answer with
the option's letter from the given choices.", for open questions "Answer the question
using a single word, phrase or number.". ``<image k>`` mentions stay as text; one naming
an image column that is null is a problem.

Answers: multiple choice -> ``choice``. Open: ``number`` when every gold is a plain
number; ``text`` (MMMU's lenient phrase match) when a gold holds a word
(``evaluate.scoring.is_word_like``: a run of three or more letters that is not a LaTeX
command or a function name such as sin, log, sqrt); ``expression`` (math-verify)
otherwise ("24/7", "x^2+1", or both numbers and expressions: "['24/7', '3.429']", whose
plain number the scorer compares as a number). An open item with a plain-number gold has
``precision`` 2: MMMU's own evaluation rounds numbers to 2 decimals, so "3.43" is gold
"3.429"; a word gold has none (the judge would be told of a rounding that cannot apply).
``category`` is the subject taken from the id ("Art_Theory").
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Optional

from megatron_r1v.data.images import ImageSource
from megatron_r1v.data.schema import CHOICE_LETTERS, IMAGE_PLACEHOLDER
from megatron_r1v.evaluate.formats.tables import (Fields, Reading, check_placeholders, collect, is_number,
                                                  read_rows, type_name)
from megatron_r1v.evaluate.items import EvalItem
from megatron_r1v.evaluate.scoring import is_word_like

REQUIRED = ("id", "question", "options", "answer", "question_type")
QUESTION_TYPES = ("multiple-choice", "open")
IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, 8))
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices."
OPEN_INSTRUCTION = "Answer the question using a single word, phrase or number."
_ID_RE = re.compile(r"^[A-Za-z]+_(?P<subject>.+)_\d+$")
_MENTION_RE = re.compile(r"<image (\d+)>")
OPEN_PRECISION = 2
"""Decimals MMMU's evaluation rounds an open numeric answer to (``eval_utils.normalize_str``)."""


def read_mmmu(path: Path, reading: Reading) -> list[EvalItem]:
    """The items of an MMMU parquet file, folder of parquet files or glob pattern."""
    if path.is_dir() and any(path.rglob("validation-*.parquet")):
        path = path / "**" / "validation-*.parquet"  # not the dev split, nor the test split's hidden answers
    return collect(read_rows(path, reading, REQUIRED), reading, _item)


def _item(fields: Fields) -> Optional[EvalItem]:
    item_id = fields.text("id")
    fields.item = item_id
    subject = _subject(fields, item_id)
    question = fields.text("question")
    question_type = fields.one_of("question_type", QUESTION_TYPES)
    options = _options(fields)
    images = {int(column.rsplit("_", 1)[1]): fields.image(column) for column in IMAGE_COLUMNS
              if fields.given(column)}
    present = {k: image for k, image in images.items() if image is not None}
    _check_mentions(fields, [question or "", *(options or [])], images)
    answers, kind = _answers(fields, question_type, options)
    if not fields.ok or None in (item_id, subject, question, question_type, options, answers, kind):
        return None
    prompt = _prompt(question, options if question_type == "multiple-choice" else [], sorted(present))
    ordered: tuple[ImageSource, ...] = tuple(present[k] for k in sorted(present))
    check_placeholders(fields, prompt, ordered)
    if not fields.ok:
        return None
    precision = OPEN_PRECISION if kind != "choice" and any(is_number(gold) for gold in answers) else None
    return EvalItem(id=item_id, question=prompt, images=ordered, answers=answers, answer_kind=kind,
                    category=subject, source=fields.row.location, precision=precision,
                    choices=tuple(options) if kind == "choice" else None, raw_question=question)


def _subject(fields: Fields, item_id: Optional[str]) -> Optional[str]:
    """"validation_Art_Theory_12" -> "Art_Theory"."""
    if item_id is None:
        return None
    match = _ID_RE.match(item_id)
    if match is None:
        fields.problem("id", f"{item_id!r} is not SPLIT_Subject_NUMBER (as 'validation_Art_Theory_12')")
        return None
    return match.group("subject")


def _options(fields: Fields) -> Optional[list[str]]:
    """``options``: a list literal in a string (MMMU's parquet) or a list, of texts."""
    value: Any = fields.value("options", False, "a list of option texts")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields.problem("options", f"not a Python list literal: {value[:80]!r}")
            return None
    if not isinstance(value, list):
        fields.problem("options", f"expected a list of option texts, got {type_name(value)}")
        return None
    options = []
    for i, option in enumerate(value):
        # MMMU writes a few numeric options unquoted in the literal.
        text = str(option) if isinstance(option, (int, float)) and not isinstance(option, bool) else option
        checked = fields.check_text(f"options[{i}]", text)
        if checked is None:
            return None
        options.append(checked)
    return options


def _check_mentions(fields: Fields, texts: list[str], images: dict[int, Optional[ImageSource]]) -> None:
    for k in sorted({int(k) for text in texts for k in _MENTION_RE.findall(text)}):
        if k not in images:
            column = f"image_{k}"
            why = "a column this file lacks" if column not in fields.row.values else "null"
            fields.problem(column, f"the text mentions <image {k}> but {column} is {why}")


def _answers(fields: Fields, question_type: Optional[str],
             options: Optional[list[str]]) -> tuple[Optional[tuple[str, ...]], Optional[str]]:
    """The gold answers and their kind."""
    answer = fields.answer("answer")
    if answer is None or question_type is None or options is None:
        return None, None
    if question_type == "multiple-choice":
        letters = CHOICE_LETTERS[:len(options)]
        if len(options) < 2:
            fields.problem("options", f"a multiple-choice question needs at least 2 options, got {len(options)}")
        elif answer.strip() not in letters:
            fields.problem("answer", f"{answer!r} is not the letter of one of the {len(options)} options "
                                     f"({letters[0]}-{letters[-1]})")
        else:
            return (answer.strip(),), "choice"
        return None, None
    golds = _open_golds(fields, answer)
    return (golds, _open_kind(golds)) if golds else (None, None)


def _open_golds(fields: Fields, answer: str) -> Optional[tuple[str, ...]]:
    """An open answer, or the several of a list literal ("['24/7', '3.429']")."""
    text = answer.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return (text,)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return (text,)  # brackets that are part of the answer, an interval say
    if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, (str, int, float))
                                                       for v in value):
        fields.problem("answer", f"expected a list literal of answer texts, got {text[:80]!r}")
        return None
    golds = tuple(str(v).strip() for v in value)
    if not all(golds):
        fields.problem("answer", f"an empty answer in {text[:80]!r}")
        return None
    return golds


def _open_kind(golds: tuple[str, ...]) -> str:
    """``number``, ``text`` or ``expression`` (module docstring)."""
    if all(is_number(gold) for gold in golds):
        return "number"
    return "text" if any(is_word_like(gold) for gold in golds) else "expression"


def _prompt(question: str, options: list[str], image_numbers: list[int]) -> str:
    """Images, question, options and the instruction (module docstring)."""
    if len(image_numbers) == 1:
        lines = [IMAGE_PLACEHOLDER]
    else:
        lines = [f"Image {k}: {IMAGE_PLACEHOLDER}" for k in image_numbers]
    lines.append(f"Question: {question}")
    if options:
        lines.append("Options:")
        lines.extend(f"{CHOICE_LETTERS[i]}. {option}" for i, option in enumerate(options))
        lines.append(CHOICE_INSTRUCTION)
    else:
        lines.append(OPEN_INSTRUCTION)
    return "\n".join(lines)
