"""Numbers in answers: what number a response or a gold answer writes, and whether two agree.

:func:`number_readings` reads a text as one number after dropping LaTeX spacing, a trailing
unit (the item's, in plain or ``\\text{}`` form, or a unit-like tail such as ``cm^2``,
``km/h``) and thousands separators ("1,000", "1{,}000", "1\\,000"); a percent sign gives two
readings, the number and a hundredth of it. What is no plain number is read by math-verify
(``\\frac{6}{2}``, ``x = 3``) when it is one finite value. :func:`numbers_equal` compares two
values at a precision, within a tolerance, exactly for an integer gold, or else up to a
relative 1e-6. The policies behind these choices are ``evaluate.scoring``'s (its docstring).
"""

from __future__ import annotations

import math
import re
from typing import Optional

from megatron_r1v.rewards.rule import DEFAULT_MAX_ANSWER_CHARS, DEFAULT_TIMEOUT_S, parse_math, unwrap_text_macros

_PLAIN_NUMBER_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:(?:,|\{,\}| )\d{3})+(?:\.\d+)?$")  # LaTeX's "\," is a space by then
_PERCENT_RE = re.compile(r"\s*\\?%$")
_LATEX_SPACE_RE = re.compile(r"\\[,;:! ]|~")
_UNIT_WORD = r"[A-Za-zµμΩ°]+(?:\^\{?-?\d\}?|[²³])?"
_UNIT_TAIL_RE = re.compile(rf"^(?P<head>.*?[\d}}.)])\s*(?P<tail>{_UNIT_WORD}(?:\s*[/·*]?\s*{_UNIT_WORD}){{0,2}})$")
# Words that make "3 and a half" or "3 million" more than a number with a unit.
_NOT_UNIT_WORDS = frozenset("and or to plus minus times over half third quarter hundred thousand million billion "
                            "dozen e i pi".split())
_REL_TOL = 1e-6
_INTEGER_ULPS = 8  # the float noise of SymPy's evalf (log_2 8), far below any written decimal


def strip_unit(text: str, unit: Optional[str]) -> str:
    """``text`` without the item's unit at its end and LaTeX spacing: "5\\,\\text{cm}" -> "5"."""
    text = " ".join(_LATEX_SPACE_RE.sub(" ", unwrap_text_macros(text)).split())
    plain_unit = " ".join(_LATEX_SPACE_RE.sub(" ", unwrap_text_macros((unit or "").strip("$"))).split())
    if plain_unit and text.endswith(plain_unit):
        head = text[:-len(plain_unit)]
        # A whole unit only: gold unit "m" must not cut "5 cm" to "5 c".
        if head.strip() and not (head[-1].isalpha() and plain_unit[0].isalpha()):
            text = head.strip()
    return text


def _sympy_number(text: str, timeout_s: Optional[int]) -> Optional[float]:
    """The value of ``text`` when math-verify reads one finite number (``x = 3`` reads 3)."""
    try:
        parsed = parse_math(text, timeout_s)
    except Exception:  # math-verify's parser or its timeout: not a number we can read
        return None
    if not parsed:
        return None
    expr = parsed[0]
    if getattr(expr, "is_Equality", False) and getattr(expr.lhs, "is_Symbol", False):
        expr = expr.rhs
    if not getattr(expr, "is_number", False):
        return None
    try:
        value = complex(expr.evalf())
    except (TypeError, ValueError):
        return None
    return value.real if value.imag == 0 and math.isfinite(value.real) else None


def _plain_or_sympy(text: str, timeout_s: Optional[int]) -> Optional[float]:
    text = text.strip().strip("$").strip()
    if _THOUSANDS_RE.match(text):
        text = re.sub(r"\{,\}|[, ]", "", text)
    if _PLAIN_NUMBER_RE.match(text):
        return float(text)
    return _sympy_number(text, timeout_s) if text else None


def number_readings(text: str, unit: Optional[str] = None,
                    timeout_s: Optional[int] = DEFAULT_TIMEOUT_S) -> list[float]:
    """The values ``text`` may mean: [] (no single number), [v], or [v, v/100] with a percent sign."""
    if len(text) > DEFAULT_MAX_ANSWER_CHARS:
        return []
    text = strip_unit(text.strip().strip("$").strip(), unit)
    percent = _PERCENT_RE.search(text)
    if percent:
        text = text[:percent.start()]
    value = _plain_or_sympy(text, timeout_s)
    if value is None and (tail := _UNIT_TAIL_RE.match(text)) is not None:
        words = re.findall(r"[A-Za-z]+", tail.group("tail").lower())
        if not _NOT_UNIT_WORDS.intersection(words):
            value = _plain_or_sympy(tail.group("head"), timeout_s)
    if value is None:
        return []
    return [value, value / 100] if percent else [value]


def numbers_equal(answer: float, gold: float, precision: Optional[int] = None,
                  tolerance: Optional[float] = None) -> bool:
    """Whether ``answer`` is ``gold``: rounded to ``precision`` decimals, within ``tolerance``,
    exactly (up to float noise) for an integer gold, else up to a relative 1e-6."""
    if precision is not None:
        return round(answer, precision) == round(gold, precision)
    if tolerance is not None:
        # The slack absorbs binary rounding (1.1 - 1.0 > 0.1).
        return abs(answer - gold) <= tolerance * (1 + 1e-9) + 1e-12
    if gold.is_integer():
        # An integer answer (AIME) is exact: the relative slack would take 998.9999 for 999.
        return abs(answer - gold) <= _INTEGER_ULPS * math.ulp(max(abs(gold), 1.0))
    return math.isclose(answer, gold, rel_tol=_REL_TOL, abs_tol=1e-12)


def is_plain_number(text: str) -> bool:
    """"3.429", "1,000", "$-2$": a number as written, no arithmetic ("24/7" is not)."""
    text = text.strip().strip("$").strip()
    return bool(_PLAIN_NUMBER_RE.match(text) or _THOUSANDS_RE.match(text))
