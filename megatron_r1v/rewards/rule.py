"""Rule-based reward r_rule of the hybrid reward (R1V2 report, Eq. 7): is the answer right?

The answer compared is the final ``\\boxed{}`` content (:func:`format.extract_answer`);
the gold is ``PromptRecord.answer``. Each ``answer_type`` has its own rule, and every
rule returns 1.0 or 0.0:

- ``number`` and ``expression``: Hugging Face's math-verify parses both sides (LaTeX or
  plain) into SymPy and compares them, so ``3``, ``3.0``, ``\\frac{6}{2}``, ``2+1`` and
  ``x=3`` all match a gold ``3``, ``0.5`` matches ``\\frac{1}{2}`` and ``50\\%``, and
  ``(x+1)^2`` matches ``x^2+2x+1``. A number followed by a unit word (``3 apples``,
  ``3 cm``, ``90^\\circ``) matches: math-verify drops the trailing text, and a reasoning
  model that names the unit has not answered wrongly. Several values (``3 or 4``,
  ``3 apples and 4 oranges``) do not match a single number. A gold that math-verify
  cannot parse falls back to the ``text`` rule.
- ``choice``: the gold is the letter of the correct option. Accepted answers are the
  letter (``B``, ``(B)``, ``B.``, ``B)``, ``B:``; uppercase only, since a lowercase
  letter may be a variable), the letter followed by the option's text (``B. 42``; the text
  must then be that option's), or the option's text alone (normalized as below). A bare
  letter is read as a letter even when some option's text is a letter too. A letter
  past the last option, or a text that two options share, scores 0.
- ``text``: normalized exact match: ``\\text{}``-style wrappers removed, Unicode NFKC,
  case folded, punctuation and the articles a/an/the dropped, whitespace collapsed.

math-verify guards its parsing and comparison with ``signal.alarm``, which only works in
the main thread of the main interpreter; anywhere else it raises. Off the main thread
the timeouts are therefore disabled (``None``) and a length cap on the answer
(``max_answer_chars``) bounds SymPy's work instead. Its default, 1000 characters, is far
above any real final answer.
"""

from __future__ import annotations

import re
import string
import threading
import unicodedata
from typing import Optional, Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from megatron_r1v.data.schema import ANSWER_TYPES, CHOICE_LETTERS

DEFAULT_TIMEOUT_S = 5
DEFAULT_MAX_ANSWER_CHARS = 1000

# \text{B}, \textbf{B}, \mathrm{B}...: the model's way of writing plain text in LaTeX.
_TEXT_MACRO_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
# "B", "(B)", "B.", "B)", "B:"; and "(B) text", "B. text", "B) text", "B: text", where
# the delimiter is required so that "A man" stays text (the option "a man").
_LETTER_RE = re.compile(r"^\(?([A-Z])\)?[.:]?$")
_LETTER_TEXT_RE = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.:)])\s*(.+)$", re.DOTALL)
_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")


def signal_timeout(timeout_s: Optional[int]) -> Optional[int]:
    """``timeout_s`` in the main thread; None elsewhere, where math-verify's signal.alarm would raise."""
    return timeout_s if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str, timeout_s: Optional[int]) -> list:
    # $...$ makes math-verify read the whole string as one LaTeX expression instead of
    # searching it for an "answer is" anchor; "no_fallback" turns unparseable text into [].
    return parse(
        f"${text}$",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        fallback_mode="no_fallback",
        parsing_timeout=timeout_s,
    )


def unwrap_text_macros(text: str) -> str:
    """``\\text{B}`` -> ``B`` (repeatedly, for nested wrappers)."""
    while True:
        unwrapped = _TEXT_MACRO_RE.sub(r"\1", text)
        if unwrapped == text:
            return text
        text = unwrapped


def normalize_text(text: str) -> str:
    """The normal form of the ``text`` rule: "The Eiffel  Tower." -> "eiffel tower"."""
    text = unicodedata.normalize("NFKC", unwrap_text_macros(text)).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") or c in string.punctuation else c for c in text)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def text_match(answer: str, gold: str) -> bool:
    gold_norm = normalize_text(gold)
    return bool(gold_norm) and normalize_text(answer) == gold_norm


def math_match(
    answer: str, gold: str, timeout_s: Optional[int] = DEFAULT_TIMEOUT_S,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
) -> bool:
    """math-verify equivalence of ``answer`` to ``gold`` (see the module docstring)."""
    if not answer.strip() or len(answer) > max_answer_chars:
        return False
    timeout_s = signal_timeout(timeout_s)
    gold_parsed = parse_math(gold, timeout_s)
    if not gold_parsed:
        return text_match(answer, gold)
    answer_parsed = parse_math(answer, timeout_s)
    if not answer_parsed:
        return False
    # verify() is not symmetric: the gold goes first (assignments like x=3 are read as 3).
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout_s))


def choice_letter(answer: str, choices: Optional[Sequence[str]]) -> Optional[str]:
    """The option letter an answer names, or None (no such option, text of no option, contradiction)."""
    answer = unwrap_text_macros(answer).strip()
    letters = CHOICE_LETTERS[: len(choices)] if choices is not None else CHOICE_LETTERS
    if (match := _LETTER_RE.match(answer)) is not None:
        return match.group(1) if match.group(1) in letters else None
    if choices is None:
        return None
    if (match := _LETTER_TEXT_RE.match(answer)) is not None:
        letter = match.group(1) or match.group(2)
        # "B. 42" names B only when 42 is option B's text.
        if letter in letters and text_match(match.group(3), choices[letters.index(letter)]):
            return letter
    named = [letters[i] for i, option in enumerate(choices) if text_match(answer, option)]
    # Two options with the same normal form cannot be told apart: no letter.
    return named[0] if len(named) == 1 else None


def rule_reward(
    answer: Optional[str], gold: str, answer_type: str, choices: Optional[Sequence[str]] = None,
    *, timeout_s: Optional[int] = DEFAULT_TIMEOUT_S, max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
) -> float:
    """r_rule of Eq. 7: 1.0 when ``answer`` is right for ``gold`` under ``answer_type``, else 0.0.

    ``answer`` None (no final answer could be extracted) scores 0.0. ``timeout_s`` is
    math-verify's per-operation timeout in whole seconds (main thread only, see above).
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type: {answer_type!r} is not one of {', '.join(ANSWER_TYPES)}")
    if answer is None:
        return 0.0
    if answer_type == "choice":
        return float(choice_letter(answer, choices) == gold.strip())
    if answer_type == "text":
        return float(text_match(answer, gold))
    return float(math_match(answer, gold, timeout_s, max_answer_chars))
