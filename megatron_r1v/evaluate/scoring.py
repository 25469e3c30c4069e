"""Rule scoring of benchmark responses: is a response's final answer an item's gold answer?

The final answer (:func:`extract_final_answer`) is the last balanced ``\\boxed{}`` after the
last ``</think>`` (``rewards.format``), else the last "answer is X" / "Answer: X" /
"final answer: X" phrase there. A response whose thought is never closed (cut in its
reasoning) has no answer, and :func:`has_final_answer` tells a judge's caller so. Each
``EvalItem.answer_kind`` (``evaluate.items.ANSWER_KINDS``) then has its rule
(:func:`score_response`); the policies a benchmark could read two ways:

- ``choice``: the letter or the option's text (``rewards.rule.choice_letter``); an answer
  math-equivalent to exactly one option's text names it too. With nothing extracted, the
  answer region's last line may name the letter alone ("(B)", "B.") or end in "(B)"
  (method "option-letter"); an answer phrase may say "option (B)". A letter past the
  options, or a letter with another option's text, is wrong. When every option's text is its
  own letter (MathVerse's vision-only items: the options are in the image), a leading
  option letter counts whatever follows it ("C. 12", "(C) 12", "C: 12").
- ``number``: a trailing unit is dropped (the item's, in plain or ``\\text{}`` form, or a
  unit-like tail such as ``cm^2``, ``km/h``; math-verify drops known words and ``^\\circ``).
  A percent sign gives two readings, the number itself and a hundredth of it: MathVista
  writes percentages as plain numbers ("50" for 50%), and "0.5" is the same quantity, so
  "50\\%" matches gold "50" and gold "0.5" (but "0.5\\%" also matches gold "0.5", an
  accepted blind spot). Thousands separators ("1,000", "1{,}000", "1\\,000") are removed.
  ``precision`` compares both values rounded to that many decimals (MathVista rounds the
  prediction the same way); ``tolerance`` accepts an absolute error up to it; otherwise an
  integer gold asks for the same value (AIME: 998.9999 is not 999; "033" and "999.0" are,
  and a few ulps absorb SymPy's float evaluation) and any other gold a relative difference
  up to 1e-6. A response that is no single number falls back to
  math-verify equivalence (``x = 3`` for 3). An answer with a range or alternative word
  ("or", "and", "to", "less", "more", "least", "most", "than", "between") is wrong, since
  math-verify would read "5 or less" as 5. Units are dropped, not checked or converted:
  "500 mm" is not 50 cm, and "5 cm" matches gold 5 with unit m. The reading and the
  comparison of numbers live in ``evaluate.numbers``.
- ``expression``: a gold that is a plain number ("3.429" of MMMU's "['24/7', '3.429']")
  takes the ``number`` rule (precision, tolerance, unit), which falls back to math-verify
  itself. Other golds: math-verify equivalence, and normalized text equality only for a
  word-like gold (:func:`is_word_like`: "Oxygen", not "x^2-1"), since the text form drops
  the signs, operators and brackets that tell "-\\frac{1}{2}" from "\\frac{1}{2}" or "(1,2)"
  from "[1, 2)". A gold math-verify cannot parse is compared as text (``rewards.rule.math_match``).
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

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megatron_r1v.data.schema import CHOICE_LETTERS
from megatron_r1v.data.tokenizer import ENDOFTEXT, IM_END, R1_EOS
from megatron_r1v.evaluate.items import EvalItem
from megatron_r1v.evaluate.numbers import is_plain_number, number_readings, numbers_equal, strip_unit
from megatron_r1v.rewards.format import answer_region, scan_boxed
from megatron_r1v.rewards.rule import (DEFAULT_TIMEOUT_S, choice_letter, math_match, normalize_text, signal_timeout,
                                       text_match, unwrap_text_macros)

METHODS: tuple[str, ...] = ("boxed", "answer-phrase", "option-letter", "yes-no", "none")
REPLY_END_TOKENS: tuple[str, ...] = (IM_END, R1_EOS, ENDOFTEXT)
"""Tokens that close a reply (QwQ, R1-Distill); decoded responses keep them."""

_PHRASE_RE = re.compile(r"\banswer\b[*_\s]*(?:is\b|:)[*_\s:]*(?P<value>[^\n]*)", re.IGNORECASE)
_LONE_LETTER_RE = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.):]?)$")
_FINAL_PAREN_LETTER_RE = re.compile(r"\(([A-Z])\)\.?$")
_OPTION_WORD_RE = re.compile(r"^(?:the\s+)?(?:option|choice)\s+", re.IGNORECASE)
_LEADING_LETTER_RE = re.compile(r"^\(?[A-Z]\)?(?:[.:)\s]|$)")
# "5 or less", "3 to 4": math-verify reads the first number; a single-number answer has no such word.
_RANGE_WORD_RE = re.compile(r"(?<![\\A-Za-z])(?:or|and|to|less|more|least|most|than|between)(?![A-Za-z])",
                            re.IGNORECASE)
_HEDGE_WORDS = frozenset("not no never neither nor or except".split())
# A word: 3+ letters not part of a LaTeX command ("\\frac") or a longer run; math function
# names written without a backslash are not words.
_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_MATH_WORDS = frozenset("sin cos tan cot sec csc log exp sqrt frac arcsin arccos arctan sinh cosh tanh".split())
_LEADING_LETTER_TEXT_RE = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.:)])")
_MAX_GOLD_WORDS, _MAX_LENIENT_ANSWER_WORDS = 4, 12


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


def has_final_answer(text: str) -> bool:
    """Whether a response closed its thought and wrote something after it (reply-end tokens aside).

    A response cut in its reasoning has no final answer for the rule or a judge to read.
    """
    region = answer_region(strip_reply_end(text))
    return region is not None and bool(region.strip())


def is_word_like(text: str) -> bool:
    """Whether ``text`` holds a word: a run of 3+ letters that is not a LaTeX command or a math
    function name ("Impressionism", "the mitochondria"; not "x^2+1", "\\sin x", "5\\text{cm}")."""
    return bool({word.lower() for word in _WORD_RE.findall(text)} - _MATH_WORDS)


def read_yes_no(text: str) -> Optional[str]:
    """"yes" or "no" when the first word of ``text`` is one ("Yes, there is a dog." -> "yes"), else None.

    Apply it to ``RuleVerdict.extracted`` of a ``yes_no`` item for hallucination metrics.
    """
    words = normalize_text(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


# --- numbers and expressions ---------------------------------------------------------------


def _number_match(answer: str, gold: str, item: EvalItem, timeout_s: Optional[int]) -> bool:
    if _RANGE_WORD_RE.search(unwrap_text_macros(answer)):
        return False
    answer_values = number_readings(answer, item.unit, timeout_s)
    gold_values = number_readings(gold, item.unit, timeout_s)
    if answer_values and gold_values:
        return any(numbers_equal(a, g, item.precision, item.tolerance) for a in answer_values for g in gold_values)
    # No single number on one side ("x = 3" parses, "3 or 4" does not): math-verify decides.
    return math_match(strip_unit(answer, item.unit), gold, timeout_s)


def _expression_match(answer: str, gold: str, item: EvalItem, timeout_s: Optional[int]) -> bool:
    if is_plain_number(strip_unit(gold, item.unit)):
        # MMMU's "3.429" beside "24/7": the benchmark compares such golds as numbers (2 decimals).
        return _number_match(answer, gold, item, timeout_s)
    if math_match(strip_unit(answer, item.unit), gold, timeout_s):
        return True
    # Normalized text drops "-", "+", "^" and brackets: only a word gold may be read as text.
    return is_word_like(gold) and text_match(answer, gold)


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


def _letters_only_choice(answer: str, choices: Sequence[str]) -> Optional[str]:
    """The leading option letter of "C. 12" / "(C) 12" when every option's text is its own letter."""
    if not choices or any(option.strip() != CHOICE_LETTERS[i] for i, option in enumerate(choices)):
        return None
    match = _LEADING_LETTER_TEXT_RE.match(unwrap_text_macros(answer).strip())
    letter = (match.group(1) or match.group(2)) if match else None
    # The text after it cannot be checked (the options are in the image), so it is not.
    return letter if letter is not None and letter in CHOICE_LETTERS[:len(choices)] else None


def _score_choice(item: EvalItem, text: str, answer: Optional[str], method: str,
                  timeout_s: Optional[int]) -> RuleVerdict:
    choices = item.choices or ()
    gold = item.answers[0].strip()
    if answer is None:
        letter = _lone_option_letter(answer_region(strip_reply_end(text)))
        if letter is None:
            return RuleVerdict(None, "none", False)
        return RuleVerdict(letter, "option-letter", choice_letter(letter, choices) == gold)
    letter = (choice_letter(answer, choices) or _letters_only_choice(answer, choices)
              or _choice_by_math(answer, choices, timeout_s))
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
    timeout_s = signal_timeout(timeout_s)
    answer, method = extract_final_answer(text)
    if item.answer_kind == "choice":
        return _score_choice(item, text, answer, method, timeout_s)
    if item.answer_kind == "yes_no":
        return _score_yes_no(item, text, answer, method)
    if answer is None:
        return RuleVerdict(None, "none", False)
    matcher = _MATCHERS[item.answer_kind]
    return RuleVerdict(answer, method, any(matcher(answer, gold, item, timeout_s) for gold in item.answers))
