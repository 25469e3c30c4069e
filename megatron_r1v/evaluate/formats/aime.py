"""AIME-style text problems: JSON Lines, JSON or parquet, as the common HF releases write them.

Keys are matched case-insensitively: the id is ``id`` | ``problem_idx`` | ``idx`` (else the
record's line number, or its row index in a parquet file), the problem ``problem`` |
``question``, the gold ``answer`` (a number or a string). This reads e.g.
``Maxwell-Jia/AIME_2024`` {ID: "2024-II-4", Problem, Solution, Answer} and
``AI-MO/aimo-validation-aime`` {id, problem, solution, answer, url}. No images.

Prompt: the problem, then "Please reason step by step, and put your final answer within
\\boxed{}.". Answers: ``number`` (AIME answers are integers 0-999; any numeric gold is
accepted), ``expression`` for a gold that is not a plain number. ``category``: the
``year`` field, else the year an id like "2024-I-1" or an AoPS ``url``
("/2022_AIME_I_Problems/...") names, else "aime".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from megatron_r1v.evaluate.formats.tables import Fields, Reading, Row, collect, is_number, read_rows
from megatron_r1v.evaluate.items import EvalItem

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
ID_KEYS = ("id", "problem_idx", "idx")
PROBLEM_KEYS = ("problem", "question")
# "2024-I-1", "2024-II-4", ".../2022_AIME_I_Problems/Problem_1": a year before AIME or a part I / II.
_YEAR_RE = re.compile(r"(?<!\d)((?:19|20)\d\d)(?=[-_ ]?(?:AIME|II?\b))", re.IGNORECASE)


def read_aime(path: Path, reading: Reading) -> list[EvalItem]:
    """The items of an AIME-style JSON Lines, JSON or parquet file."""
    return collect((_lower_keys(row) for row in read_rows(path, reading)), reading, _item)


def _lower_keys(row: Row) -> Row:
    """The row with its keys lower-cased (the first of two that differ only in case wins)."""
    values: dict = {}
    for key, value in row.values.items():
        values.setdefault(key.lower() if isinstance(key, str) else key, value)
    return Row(row.location, values, row.file, row.folder, row.number, row.key)


def _item(fields: Fields) -> Optional[EvalItem]:
    values = fields.row.values
    id_key = next((k for k in ID_KEYS if values.get(k) is not None), None)
    item_id = fields.item_id(id_key) if id_key else str(fields.row.number)
    problem_key = next((k for k in PROBLEM_KEYS if k in values), None)
    if problem_key is None:
        fields.problem("problem", f"missing field (one of {', '.join(PROBLEM_KEYS)}, in any case)")
        return None
    problem = fields.text(problem_key)
    answer = fields.answer("answer")
    year = _year(fields)
    if not fields.ok or item_id is None or problem is None or answer is None:
        return None
    return EvalItem(id=item_id, question=f"{problem}\n{INSTRUCTION}", images=(), answers=(answer.strip(),),
                    answer_kind="number" if is_number(answer) else "expression", category=year or "aime",
                    source=fields.row.location, raw_question=problem)


def _year(fields: Fields) -> Optional[str]:
    """The year of ``year``, of an id such as "2024-I-1", or of an AoPS url."""
    year = fields.row.values.get("year")
    if year is not None:
        if isinstance(year, bool) or not isinstance(year, (int, str)) or not str(year).strip():
            fields.problem("year", f"expected a year (an integer or a string), got {year!r}")
            return None
        return str(year).strip()
    for key in (*ID_KEYS, "url"):
        value = fields.row.values.get(key)
        match = _YEAR_RE.search(value) if isinstance(value, str) else None
        if match:
            return match.group(1)
    return None
