"""MathVerse testmini (Zhang et al., 2024): the official ``testmini.json`` or the HF parquet
(``AI4Math/MathVerse``, config ``testmini``).

Fields: ``sample_index`` (the id), ``problem_index``, ``problem_version`` ("Text Dominant",
"Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only", "Text Only"),
``question`` (empty for Vision Only, whose question is in the image), ``image``
("images_version_1-4/image_1.png" relative to the file's folder, "" for Text Only; in the
parquet a struct holding the bytes), ``answer``, ``question_type`` ("multi-choice" |
"free-form"), ``metadata`` {split, source, subject, subfield}, ``query_wo``,
``query_cot``, ``question_for_eval``.

Prompt: ``query_cot`` (MathVerse's chain-of-thought instruction with the question) when
present and non-empty, else ``question``. Images go before the text. ``raw_question`` is
``question_for_eval`` (the question in words, also for Vision Only) when given, else
``question``.

Answers: multi-choice -> ``choice``, the option texts parsed from the question ("Choices:"
then one option per line, "A:1", "A. 1", "(A) 1"); when they cannot be parsed (Vision
Only: the options are in the image) the choices are the letters A-E themselves. The answer
must be an option letter. Free-form -> ``number`` for a plain number, else ``expression``.
``category`` is ``problem_version``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from megatron_r1v.data.images import ImageSource
from megatron_r1v.data.schema import CHOICE_LETTERS
from megatron_r1v.evaluate.formats.tables import Fields, Reading, check_placeholders, collect, is_number, read_rows
from megatron_r1v.evaluate.items import EvalItem

REQUIRED = ("sample_index", "problem_version", "question", "answer", "question_type")
QUESTION_TYPES = ("multi-choice", "free-form")
TEXT_ONLY = "Text Only"
FALLBACK_LETTERS = tuple(CHOICE_LETTERS[:5])
_OPTION_RE = re.compile(r"^\s*(?:\((?P<paren>[A-Z])\)|(?P<letter>[A-Z])\s*[:.：])\s*(?P<text>\S.*?)\s*$")


def read_mathverse(path: Path, reading: Reading) -> list[EvalItem]:
    """The items of a MathVerse testmini JSON or parquet file."""
    return collect(read_rows(path, reading, REQUIRED), reading, _item)


def _item(fields: Fields) -> Optional[EvalItem]:
    item_id = fields.item_id("sample_index")
    fields.item = item_id
    version = fields.text("problem_version")
    question = fields.text("question", empty_ok=True)
    question_type = fields.one_of("question_type", QUESTION_TYPES)
    answer = fields.answer("answer")
    query = fields.text("query_cot", optional=True, empty_ok=True)
    for_eval = fields.text("question_for_eval", optional=True, empty_ok=True)
    image = fields.image("image", required=version is not None and version != TEXT_ONLY)
    images: tuple[ImageSource, ...] = (image,) if image is not None else ()
    prompt = query if query and query.strip() else question
    if question is not None and not (prompt and prompt.strip()):
        fields.problem("question", "empty, and no query_cot to show instead")
    choices, answers = None, (answer.strip(),) if answer is not None else None
    if question_type == "multi-choice" and answer is not None:
        choices = _choices(for_eval or question or "", prompt or "")
        if answer.strip() not in CHOICE_LETTERS[:len(choices)]:
            fields.problem("answer", f"{answer!r} is not the letter of one of the {len(choices)} options "
                                     f"(A-{CHOICE_LETTERS[len(choices) - 1]})")
    if not fields.ok or None in (item_id, version, question, question_type, answers, prompt):
        return None
    check_placeholders(fields, prompt, images)
    if not fields.ok:
        return None
    kind = "choice" if choices else ("number" if is_number(answers[0]) else "expression")
    return EvalItem(id=item_id, question=prompt, images=images, answers=answers, answer_kind=kind,
                    category=version, source=fields.row.location, choices=choices,
                    raw_question=for_eval if for_eval and for_eval.strip() else question)


def _choices(*texts: str) -> tuple[str, ...]:
    """The options listed in the first of ``texts`` that has some, else the letters A-E."""
    for text in texts:
        options = parse_options(text)
        if options:
            return options
    return FALLBACK_LETTERS


def parse_options(text: str) -> Optional[tuple[str, ...]]:
    """The option texts of "Choices:\\nA:1\\nB:2" (also "A. 1", "(A) 1") in letter order; None
    without at least two options lettered A, B, ... on consecutive lines."""
    start = text.rfind("Choices")
    lines = text[start:].splitlines() if start >= 0 else text.splitlines()
    options: list[str] = []
    for line in lines:
        match = _OPTION_RE.match(line)
        letter = (match.group("paren") or match.group("letter")) if match else None
        if match and len(options) < len(CHOICE_LETTERS) and letter == CHOICE_LETTERS[len(options)]:
            options.append(match.group("text"))
        elif options:
            break  # the list ended
    return tuple(options) if len(options) >= 2 else None
