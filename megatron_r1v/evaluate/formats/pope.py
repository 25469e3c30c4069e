"""Yes/no object-hallucination questions in POPE's format (Li et al., 2023).

Two releases: the HF parquet ``lmms-lab/POPE`` (``id``, ``question_id``, ``question``,
``answer`` "yes" | "no", ``image_source``, ``image`` a struct holding the bytes,
``category`` "adversarial" | "popular" | "random"), and POPE's own JSON Lines
(``question_id``, ``image`` a file name relative to the JSONL's folder, ``text`` the
question, ``label`` the answer; ``answer`` / ``question`` are accepted too).

The id is ``id`` when given, else ``question_id``, prefixed by the category when there is
one ("random/12": POPE numbers each category's questions from 1). Prompt: the question
and " Please answer yes or no."; the image goes before it. Answers: ``yes_no``, ("yes",)
or ("no",). ``category``: the ``category`` field, else "all".
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_r1v.evaluate.formats.tables import Fields, Reading, check_placeholders, collect, read_rows
from megatron_r1v.evaluate.items import EvalItem

INSTRUCTION = " Please answer yes or no."
ANSWERS = ("yes", "no")


def read_pope(path: Path, reading: Reading) -> list[EvalItem]:
    """The items of a POPE-format parquet or JSON Lines file."""
    return collect(read_rows(path, reading), reading, _item)


def _first(fields: Fields, names: tuple[str, ...]) -> str:
    """The first of ``names`` the row has (the first name when none, for the message)."""
    return next((name for name in names if name in fields.row.values), names[0])


def _item(fields: Fields) -> Optional[EvalItem]:
    category = fields.text("category", optional=True)
    if fields.given("id"):
        item_id = fields.item_id("id")
    else:
        question_id = fields.item_id("question_id")
        item_id = f"{category}/{question_id}" if category and question_id is not None else question_id
    fields.item = item_id
    question = fields.text(_first(fields, ("question", "text")))
    answer_field = _first(fields, ("answer", "label"))
    answer = fields.text(answer_field)
    if answer is not None and answer.strip().lower() not in ANSWERS:
        fields.problem(answer_field, f"expected 'yes' or 'no', got {answer!r}")
    image = fields.image("image", required=True)
    if not fields.ok or None in (item_id, question, answer, image):
        return None
    prompt = question.rstrip() + INSTRUCTION
    check_placeholders(fields, prompt, (image,))
    if not fields.ok:
        return None
    return EvalItem(id=item_id, question=prompt, images=(image,), answers=(answer.strip().lower(),),
                    answer_kind="yes_no", category=category or "all", source=fields.row.location,
                    raw_question=question)
