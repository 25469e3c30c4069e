"""MathVista testmini (Lu et al., 2024): the official ``testmini.json`` or the HF parquet.

Fields (both releases): ``pid``, ``question``, ``image`` ("images/1.jpg", relative to the
file's folder), ``choices`` (option texts or null), ``unit``, ``precision`` (1.0, 2.0, ...
or null), ``answer`` (a string; for ``multi_choice`` one of the choices' texts),
``question_type`` ("multi_choice" | "free_form"), ``answer_type`` ("text" | "integer" |
"float" | "list"), ``metadata``, ``query``. The JSON file is an object keyed by pid; the
parquet (``AI4Math/MathVista``, split ``testmini``) adds ``decoded_image``, a struct holding
the image's bytes, used instead of ``image`` when present.

Prompt: ``query`` when present and non-empty (MathVista's own hint and question, with
the choices listed), else the same hint built here. The image goes before the text.

Answers: ``multi_choice`` -> ``choice`` with the option texts and the letter of the option
equal to ``answer``; ``integer`` -> ``number``; ``float`` -> ``number`` with
``precision`` decimals; ``list`` -> ``list``; ``text`` -> ``text``. ``unit`` is kept;
``category`` is ``question_type``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_r1v.data.images import ImageSource
from megatron_r1v.data.schema import CHOICE_LETTERS
from megatron_r1v.evaluate.formats.tables import Fields, Reading, check_placeholders, collect, is_number, read_rows
from megatron_r1v.evaluate.items import EvalItem

REQUIRED = ("pid", "question", "answer", "question_type", "answer_type")
QUESTION_TYPES = ("multi_choice", "free_form")
ANSWER_TYPES = ("text", "integer", "float", "list")
_KINDS = {"integer": "number", "float": "number", "list": "list", "text": "text"}
_DECIMAL_WORDS = {1: "one decimal place", 2: "two decimal places", 3: "three decimal places"}


def read_mathvista(path: Path, reading: Reading) -> list[EvalItem]:
    """The items of a MathVista testmini JSON or parquet file."""
    return collect(read_rows(path, reading, REQUIRED), reading, _item)


def _item(fields: Fields) -> Optional[EvalItem]:
    pid = fields.item_id("pid")
    fields.item = pid
    if pid is not None and fields.row.key is not None and fields.row.key != pid:
        fields.problem("pid", f"{pid!r} differs from the record's key {fields.row.key!r}")
    question = fields.text("question")
    question_type = fields.one_of("question_type", QUESTION_TYPES)
    answer_type = fields.one_of("answer_type", ANSWER_TYPES)
    answer = fields.answer("answer")
    unit = fields.text("unit", optional=True, empty_ok=True) or None
    precision = _precision(fields)
    image = _image(fields)
    query = fields.text("query", optional=True, empty_ok=True)
    choices = fields.text_list("choices", optional=question_type != "multi_choice")
    if answer is not None and answer_type == "integer" and not is_number(answer):
        fields.problem("answer", f"{answer!r} is not a number (answer_type 'integer')")
    letter = _choice_letter(fields, answer, choices) if question_type == "multi_choice" else None
    if not fields.ok or None in (pid, question, question_type, answer_type, answer, image):
        return None
    prompt = query if query and query.strip() else build_query(question, question_type, answer_type, precision,
                                                            unit, choices)
    check_placeholders(fields, prompt, (image,))
    if not fields.ok:
        return None
    is_choice = question_type == "multi_choice"
    return EvalItem(
        id=pid, question=prompt, images=(image,), answers=(letter if is_choice else answer,),
        answer_kind="choice" if is_choice else _KINDS[answer_type], category=question_type,
        source=fields.row.location, choices=tuple(choices) if is_choice and choices else None,
        precision=precision if answer_type == "float" and not is_choice else None, unit=unit,
        raw_question=question,
    )


def _precision(fields: Fields) -> Optional[int]:
    """``precision``: null or a non-negative integer-valued number (JSON has 1.0, 2.0)."""
    value = fields.number("precision", optional=True)
    if value is None:
        return None
    if value < 0 or not value.is_integer():
        fields.problem("precision", f"expected a non-negative whole number of decimals, got {value:g}")
        return None
    return int(value)


def _image(fields: Fields) -> Optional[ImageSource]:
    """The parquet's embedded ``decoded_image``, else the ``image`` file."""
    if fields.given("decoded_image"):
        return fields.image("decoded_image", required=True)
    return fields.image("image", required=True)


def _choice_letter(fields: Fields, answer: Optional[str], choices: Optional[list[str]]) -> Optional[str]:
    if answer is None or choices is None:
        return None
    if len(choices) > len(CHOICE_LETTERS):
        fields.problem("choices", f"{len(choices)} options; at most {len(CHOICE_LETTERS)} have letters")
        return None
    if answer not in choices:
        fields.problem("answer", f"{answer!r} is not one of the choices {choices!r}")
        return None
    return CHOICE_LETTERS[choices.index(answer)]


def build_query(question: str, question_type: Optional[str], answer_type: Optional[str], precision: Optional[int],
           unit: Optional[str], choices: Optional[list[str]]) -> str:
    """MathVista's prompt for a record without ``query``: hint, question (unit), choices."""
    lines = [f"Hint: {_hint(question_type, answer_type, precision)}",
             f"Question: {question}" + (f" (Unit: {unit})" if unit else "")]
    if question_type == "multi_choice" and choices:
        lines.append("Choices:")
        lines.extend(f"({CHOICE_LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    return "\n".join(lines)


def _hint(question_type: Optional[str], answer_type: Optional[str], precision: Optional[int]) -> str:
    """The answer-format hint MathVista's queries open with."""
    if question_type == "multi_choice":
        return "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
    if answer_type == "integer":
        return "Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, " \
               "at the end."
    if answer_type == "float" and precision:
        places = _DECIMAL_WORDS.get(precision, f"{precision} decimal places")
        # 1.2, 1.3, 1.4 for one decimal; 1.23, 1.34, 1.45 for two (MathVista's examples).
        examples = ", ".join("1." + "".join(str((first + k) % 10) for k in range(precision)) for first in (2, 3, 4))
        return f"Please answer the question requiring a floating-point number with {places} and provide the " \
               f"final value, e.g., {examples}, at the end."
    if answer_type == "float":
        return "Please answer the question requiring a floating-point number and provide the final value, " \
               "e.g., 1.2, 1.3, 1.4, at the end."
    if answer_type == "list":
        return "Please answer the question requiring a Python list as an answer and provide the final list, " \
               "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end."
    return "Please answer the question and provide the final answer at the end."
