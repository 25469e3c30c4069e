"""Rule scoring of benchmark responses: is a response's final answer an item's gold answer?

The final answer (:func:`extract_final_answer`) is the last balanced ``\\boxed{}`` after the
last ``</think>`` (``rewards.format``), else the last "answer is X" / "Answer: X" /
"final answer: X" phrase there. A response whose thought is never closed (cut in its
reasoning) has no answer. Each ``EvalItem.answer_kind`` (``evaluate.items.ANSWER_KINDS``)
then has its rule (:func:`score_response`); the policies a benchmark could read two ways:

- ``choice``: the letter or the option's text (``rewards.rule.choice_letter``); an answer
  math-equivalent to exactly one option's text names it too. With nothing extracted, the
  answer region's last line may name the letter alone ("(B)", "B.") or end in "(B)"
  (method "option-letter"); an answer phrase may say "option (B)". A letter past the
  options, or a letter with another option's text, is wrong.
- ``number``: a trailing unit is dropped (the item's, in plain or ``\\text{}`` form, or a
  unit-like tail such as ``cm^2``, ``km/h``; math-verify drops known words and ``^\\circ``).
  A percent sign gives two readings, the number itself and a hundredth of it: MathVista
  writes percentages as plain numbers ("50" for 50%), and "0.5" is the same quantity, so
  "50\\%" matches gold "50" and gold "0.5" (but "0.5\\%" also matches gold "0.5", an
  accepted blind spot). Thousands separators ("1,000", "1{,}000", "1\\,000") are removed.
  ``precision`` compares both values rounded to that many decimals (MathVista rounds the
  prediction the same way); ``tolerance`` accepts an absolute error up to it; otherwise a
  relative difference up to 1e-6. A response that is no single number falls back to
  math-verify equivalence (``x = 3`` for 3). An answer with a range or alternative word
  ("or", "and", "to", "less", "more", "least", "most", "than", "between") is wrong, since
  math-verify would read "5 or less" as 5. Units are dropped, not checked or converted:
  "500 mm" is not 50 cm, and "5 cm" matches gold 5 with unit m.
- ``text``: normalized exact match (``rewards.rule.text_match``), plus MMMU's open-answer
  leniency: a gold of at most 4 normalized words counts when it occurs as a whole-word
  phrase in an answer of at most 12 normalized words holding none of "not", "no", "never",
  "neither", "nor", "or", "except" that the gold does not hold itself. The reverse (the
  answer a part of the gold) does not count.
- ``list``: both sides are split at top-level commas after one outer pair of brackets is
  removed; commas therefore never read as thousands separators in lists. The lengths must
  be equal and the elements match as multisets (OlympiadBench's multiple answers are
  order-insensitive; one policy for every benchmark), each pair as a ``number`` (with the
  item's precision, tolerance and unit) or, failing that, as an ``expression``.
- ``yes_no``: the first word of the extracted answer, else of the answer region
  ("Yes, there is a dog." reads yes). :func:`read_yes_no` reads a verdict's ``extracted``.

math-verify's timeouts use ``signal.alarm``, so they apply in the main thread only and a
length cap bounds the work elsewhere (``rewards.rule``); nothing here starts threads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megatron_r1v.data.schema import CHOICE_LETTERS
from megatron_r1v.data.tokenizer import ENDOFTEXT, IM_END, R1_EOS
from megatron_r1v.evaluate.items import EvalItem
from megatron_r1v.rewards.format import answer_region, scan_boxed
from megatron_r1v.rewards.rule import (DEFAULT_MAX_ANSWER_CHARS, DEFAULT_TIMEOUT_S, _parse_math, _signal_timeout,
                                       choice_letter, math_match, normalize_text, text_match, unwrap_text_macros)

METHODS: tuple[str, ...] = ("boxed", "answer-phrase", "option-letter", "yes-no", "none")
REPLY_END_TOKENS: tuple[str, ...] = (IM_END, R1_EOS, ENDOFTEXT)
"""Tokens that close a reply (QwQ, R1-Distill); decoded responses keep them."""

_PHRASE_RE = re.compile(r"\banswer\b[*_\s]*(?:is\b|:)[*_\s:]*(?P<value>[^\n]*)", re.IGNORECASE)
_LONE_LETTER_RE = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.):]?)$")
_FINAL_PAREN_LETTER_RE = re.compile(r"\(([A-Z])\)\.?$")
_OPTION_WORD_RE = re.compile(r"^(?:the\s+)?(?:option|choice)\s+", re.IGNORECASE)
_LEADING_LETTER_RE = re.compile(r"^\(?[A-Z]\)?(?:[.:)\s]|$)")
_PLAIN_NUMBER_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:(?:,|\{,\}| )\d{3})+(?:\.\d+)?$")  # LaTeX's "\," is a space by then
_PERCENT_RE = re.compile(r"\s*\\?%$")
_LATEX_SPACE_RE = re.compile(r"\\[,;:! ]|~")
_UNIT_WORD = r"[A-Za-zµμΩ°]+(?:\^\{?-?\d\}?|[²³])?"
_UNIT_TAIL_RE = re.compile(rf"^(?P<head>.*?[\d}}.)])\s*(?P<tail>{_UNIT_WORD}(?:\s*[/·*]?\s*{_UNIT_WORD}){{0,2}})$")
# Words that make "3 and a half" or "3 million" more than a number with a unit.
_NOT_UNIT_WORDS = frozenset("and or to plus minus times over half third quarter hundred thousand million billion "
                            "dozen e i pi".split())
# "5 or less", "3 to 4": math-verify reads the first number; a single-number answer has no such word.
_RANGE_WORD_RE = re.compile(r"(?<![\\A-Za-z])(?:or|and|to|less|more|least|most|than|between)(?![A-Za-z])",
                            re.IGNORECASE)
_HEDGE_WORDS = frozenset("not no never neither nor or except".split())
_MAX_GOLD_WORDS, _MAX_LENIENT_ANSWER_WORDS = 4, 12
_REL_TOL = 1e-6


@dataclass(frozen=True)
class RuleVerdict:
    """How the rule scored one response."""

    extracted: Optional[str]
    """The answer read (boxed content, phrase, option letter or yes/no word); None when none."""
    method: str
    """One of :data:`METHODS`: where the answer came from."""
    correct: bool


def strip_reply_end(text: str) -> str:
    """``text`` without the reply-closing special tokens (wherever they are)."""
    for token in REPLY_END_TOKENS:
        text = text.replace(token, "")
    return text


def _clean_phrase_value(value: str) -> str:
    value = value.strip().strip("*_").strip()
    value = value.rstrip(".").strip()
    for opening, closing in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if value.startswith(opening) and value.endswith(closing) and len(value) >= len(opening) + len(closing):
            value = value[len(opening):len(value) - len(closing)]
    return value.strip("$").rstrip(".").strip()


def extract_final_answer(text: str) -> tuple[Optional[str], str]:
    """(answer, method) of a response: method "boxed", "answer-phrase" or "none" (answer None).

    The last ``\\boxed{}`` after the last ``</think>``; an empty or unclosed last box (a
    generation cut while writing it) is no answer. Without a box, the value of the last
    answer phrase there, up to the end of its line, trailing period and ``$`` removed.
    """
    region = answer_region(strip_reply_end(text))
    if region is None:
        return None, "none"
    scan = scan_boxed(region)
    if scan.contents or not scan.balanced:
        answer = scan.contents[-1].strip() if scan.balanced else ""
        return (answer, "boxed") if answer else (None, "none")
    values = [_clean_phrase_value(m.group("value")) for m in _PHRASE_RE.finditer(region)]
    values = [v for v in values if v]
    return (values[-1], "answer-phrase") if values else (None, "none")


def read_yes_no(text: str) -> Optional[str]:
    """"yes" or "no" when the first word of ``text`` is one ("Yes, there is a dog." -> "yes"), else None.

    Apply it to ``RuleVerdict.extracted`` of a ``yes_no`` item for hallucination metrics.
    """
    words = normalize_text(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


# --- numbers -------------------------------------------------------------------------------


def _strip_unit(text: str, unit: Optional[str]) -> str:
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
        parsed = _parse_math(text, timeout_s)
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
    text = _strip_unit(text.strip().strip("$").strip(), unit)
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


def _numbers_equal(answer: float, gold: float, item: EvalItem) -> bool:
    if item.precision is not None:
        return round(answer, item.precision) == round(gold, item.precision)
    if item.tolerance is not None:
        # The slack absorbs binary rounding (1.1 - 1.0 > 0.1).
        return abs(answer - gold) <= item.tolerance * (1 + 1e-9) + 1e-12
    return math.isclose(answer, gold, rel_tol=_REL_TOL, abs_tol=1e-12)


def _number_match(answer: str, gold: str, item: EvalItem, timeout_s: Optional[int]) -> bool:
    if _RANGE_WORD_RE.search(unwrap_text_macros(answer)):
        return False
    answer_values = number_readings(answer, item.unit, timeout_s)
    gold_values = number_readings(gold, item.unit, timeout_s)
    if answer_values and gold_values:
        return any(_numbers_equal(a, g, item) for a in answer_values for g in gold_values)
    # No single number on one side ("x = 3" parses, "3 or 4" does not): math-verify decides.
    return math_match(_strip_unit(answer, item.unit), gold, timeout_s)


def _expression_match(answer: str, gold: str, item: EvalItem, timeout_s: Optional[int]) -> bool:
    return math_match(_strip_unit(answer, item.unit), gold, timeout_s) or text_match(answer, gold)


# --- text and lists ------------------------------------------------------------------------


def lenient_text_match(answer: str, gold: str) -> bool:
    """Exact normalized match, or a short gold as a whole-word phrase of a short answer (module docstring)."""
    if text_match(answer, gold):
        return True
    gold_words, answer_words = normalize_text(gold).split(), normalize_text(answer).split()
    if not gold_words or len(gold_words) > _MAX_GOLD_WORDS or len(answer_words) > _MAX_LENIENT_ANSWER_WORDS:
        return False
    if _HEDGE_WORDS.intersection(answer_words) - set(gold_words):
        return False
    n = len(gold_words)
    return any(answer_words[i:i + n] == gold_words for i in range(len(answer_words) - n + 1))


_BRACKET_PAIRS = {"(": ")", "[": "]", "{": "}"}


def _outer_group_end(text: str) -> int:
    """Index where the bracket opened at ``text[0]`` closes (-1 when it never does)."""
    depth = 0
    for i, char in enumerate(text):
        if char in _BRACKET_PAIRS:
            depth += 1
        elif char in _BRACKET_PAIRS.values():
            depth -= 1
            if depth == 0:
                return i
    return -1


def split_list(text: str) -> list[str]:
    """"[1, (2, 3)]" -> ["1", "(2, 3)"]: top-level comma split after one outer bracket pair."""
    text = re.sub(r"\\left\b|\\right\b", "", text).replace("\\{", "{").replace("\\}", "}").strip()
    if text[:1] in _BRACKET_PAIRS and _outer_group_end(text) == len(text) - 1:
        text = text[1:-1]
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in _BRACKET_PAIRS
        depth -= char in _BRACKET_PAIRS.values()
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _list_match(answer: str, gold: str, item: EvalItem, timeout_s: Optional[int]) -> bool:
    answer_parts, gold_parts = split_list(answer), split_list(gold)
    if len(answer_parts) != len(gold_parts) or not all(answer_parts):
        return False
    unused = list(answer_parts)
    # Greedy multiset matching: exact for an equivalence relation, which these comparisons are
    # up to tolerance edge cases.
    for gold_part in gold_parts:
        hit = next((a for a in unused if _element_match(a, gold_part, item, timeout_s)), None)
        if hit is None:
            return False
        unused.remove(hit)
    return True


def _element_match(answer: str, gold: str, item: EvalItem, timeout_s: Optional[int]) -> bool:
    if number_readings(gold, item.unit, timeout_s):
        return _number_match(answer, gold, item, timeout_s)
    return _expression_match(answer, gold, item, timeout_s)


# --- per kind ------------------------------------------------------------------------------


def _lone_option_letter(region: Optional[str]) -> Optional[str]:
    """The letter a region's last line names alone ("(B)", "B.") or ends with as "(B)"."""
    lines = [line.strip().strip("*_").strip() for line in (region or "").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    if (match := _LONE_LETTER_RE.match(lines[-1])) is not None:
        return match.group(1) or match.group(2)
    match = _FINAL_PAREN_LETTER_RE.search(lines[-1])
    return match.group(1) if match else None


def _choice_by_math(answer: str, choices: Sequence[str], timeout_s: Optional[int]) -> Optional[str]:
    """The letter of the one option math-equivalent to ``answer`` ("2.0" for option "2")."""
    if _LEADING_LETTER_RE.match(answer):  # "B. 42" already failed as a letter: no second reading
        return None
    hits = [CHOICE_LETTERS[i] for i, option in enumerate(choices) if math_match(answer, option, timeout_s)]
    return hits[0] if len(hits) == 1 else None


def _score_choice(item: EvalItem, text: str, answer: Optional[str], method: str,
                  timeout_s: Optional[int]) -> RuleVerdict:
    choices = item.choices or ()
    gold = item.answers[0].strip()
    if answer is None:
        letter = _lone_option_letter(answer_region(strip_reply_end(text)))
        if letter is None:
            return RuleVerdict(None, "none", False)
        return RuleVerdict(letter, "option-letter", choice_letter(letter, choices) == gold)
    letter = choice_letter(answer, choices) or _choice_by_math(answer, choices, timeout_s)
    if letter is None and method == "answer-phrase":
        # "The answer is option (B)." / "Answer: choice B": a phrase carries such wording.
        lone = _lone_option_letter(_OPTION_WORD_RE.sub("", answer))
        letter = choice_letter(lone, choices) if lone else None
    return RuleVerdict(answer, method, letter == gold)


def _score_yes_no(item: EvalItem, text: str, answer: Optional[str], method: str) -> RuleVerdict:
    gold = read_yes_no(item.answers[0])
    if answer is None:
        region = answer_region(strip_reply_end(text))
        word = read_yes_no(region) if region is not None else None
        return RuleVerdict(word, "yes-no", word == gold) if word else RuleVerdict(None, "none", False)
    return RuleVerdict(answer, method, gold is not None and read_yes_no(answer) == gold)


_MATCHERS: dict[str, Callable[[str, str, EvalItem, Optional[int]], bool]] = {
    "number": _number_match,
    "expression": _expression_match,
    "text": lambda answer, gold, item, timeout_s: lenient_text_match(answer, gold),
    "list": _list_match,
}


def score_response(item: EvalItem, text: str, timeout_s: Optional[int] = DEFAULT_TIMEOUT_S) -> RuleVerdict:
    """The rule's verdict on one decoded response (special tokens kept) to ``item``.

    ``timeout_s``: math-verify's per-operation timeout (main thread only, ``rewards.rule``).
    """
    timeout_s = _signal_timeout(timeout_s)
    answer, method = extract_final_answer(text)
    if item.answer_kind == "choice":
        return _score_choice(item, text, answer, method, timeout_s)
    if item.answer_kind == "yes_no":
        return _score_yes_no(item, text, answer, method)
    if answer is None:
        return RuleVerdict(None, "none", False)
    matcher = _MATCHERS[item.answer_kind]
    return RuleVerdict(answer, method, any(matcher(answer, gold, item, timeout_s) for gold in item.answers))
