"""Format reward r_format of the hybrid reward (R1V2 report, Eq. 7) and answer extraction.

The report adds "a format reward r_format to align the model's output with the DeepSeek
R1-style chat template": reasoning inside ``<think>...</think>``, then the answer. This
project asks for the final answer in ``\\boxed{...}`` (the template's system prompt
says so), so a well-formed completion is

    <think>\\n reasoning \\n</think>\\n\\n The answer is \\boxed{7}.

QwQ's generation prompt already opens the assistant turn with ``<think>\\n``
(``data.template.TemplateConfig.open_think``), so the decoded completion usually starts
inside the thought. ``think_opened_by_prompt`` selects which shape is expected:

- ``True``:  no ``<think>`` at all and exactly one ``</think>``;
- ``False``: exactly one ``<think>`` (only whitespace before it), then exactly one ``</think>``.

Either way the thought must hold some non-whitespace text (an empty thought is the
collapse R1-style training has to avoid, so it earns no format reward), and the text
after ``</think>`` must hold at least one ``\\boxed{...}``, every one of them with
balanced braces and the last one non-empty. The final answer is the content of that
last ``\\boxed{}``. Anything else scores 0 and :class:`FormatResult.reason` says why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from megatron_r1v.data.tokenizer import THINK_END, THINK_START

# LaTeX allows a space between the macro and its argument; "\boxed 7" (no braces) is not
# accepted: without braces the extent of the answer is a guess.
_BOXED_RE = re.compile(r"\\boxed\s*\{")


@dataclass(frozen=True)
class BoxedScan:
    """The ``\\boxed{}`` contents of a text, in order, and whether every box was closed."""

    contents: tuple[str, ...]
    balanced: bool


@dataclass(frozen=True)
class FormatResult:
    score: float
    """1.0 for a well-formed completion, else 0.0."""
    answer: Optional[str]
    """Content of the last ``\\boxed{}`` after ``</think>`` (None when there is none or a box is unclosed)."""
    reason: str
    """"ok", or what is wrong (for logs and metrics)."""


def scan_boxed(text: str) -> BoxedScan:
    """Every ``\\boxed{...}`` in ``text`` with nested braces matched.

    ``\\{``, ``\\}`` and ``\\\\`` are escapes, not structure, so ``\\boxed{\\{1, 2\\}}``
    holds ``\\{1, 2\\}``. Scanning stops at the first box that is never closed
    (``balanced=False``): everything after it is inside that box.
    """
    contents: list[str] = []
    pos = 0
    while (match := _BOXED_RE.search(text, pos)) is not None:
        start = i = match.end()
        depth = 1
        while i < len(text):
            char = text[i]
            if char == "\\" and i + 1 < len(text) and text[i + 1] in "{}\\":
                i += 2
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        if depth:
            return BoxedScan(tuple(contents), balanced=False)
        contents.append(text[start:i])
        pos = i + 1
    return BoxedScan(tuple(contents), balanced=True)


def answer_region(completion: str) -> Optional[str]:
    """The text after the last ``</think>``; None when the thought is never closed."""
    end = completion.rfind(THINK_END)
    return None if end < 0 else completion[end + len(THINK_END):]


def extract_answer(completion: str) -> Optional[str]:
    """The final answer: the content of the last ``\\boxed{}`` after the last ``</think>``.

    None when there is no ``</think>``, no box after it, or a box there is unclosed
    (typically a generation cut at ``max_new_tokens``: the box that was being written,
    not an earlier one, would have been the answer). Surrounding whitespace is stripped.
    This is independent of :func:`check_format`, so a correct answer in a completion with
    a duplicated tag still earns the rule reward; Eq. 7 adds the terms independently.
    """
    region = answer_region(completion)
    if region is None:
        return None
    scan = scan_boxed(region)
    if not scan.balanced or not scan.contents:
        return None
    return scan.contents[-1].strip()


def check_format(completion: str, think_opened_by_prompt: bool = True) -> FormatResult:
    """Scores the R1-style shape of one completion (see the module docstring)."""
    n_open, n_close = completion.count(THINK_START), completion.count(THINK_END)
    if think_opened_by_prompt:
        if n_open:
            return FormatResult(0.0, None, f"{THINK_START} in the completion although the prompt opened it")
        thought_start = 0
    else:
        if n_open == 0:
            return FormatResult(0.0, None, f"missing {THINK_START}")
        if n_open > 1:
            return FormatResult(0.0, None, f"{THINK_START} appears {n_open} times")
        thought_start = completion.index(THINK_START)
        if completion[:thought_start].strip():
            return FormatResult(0.0, None, f"text before {THINK_START}")
        thought_start += len(THINK_START)
    if n_close == 0:
        return FormatResult(0.0, None, f"unclosed thought: missing {THINK_END}")
    if n_close > 1:
        return FormatResult(0.0, None, f"{THINK_END} appears {n_close} times")
    # Only whitespace precedes the thought's start, so the one </think> comes after it.
    thought_end = completion.index(THINK_END)
    if not completion[thought_start:thought_end].strip():
        return FormatResult(0.0, None, "empty thought")
    scan = scan_boxed(completion[thought_end + len(THINK_END):])
    if not scan.balanced:
        return FormatResult(0.0, None, "unbalanced braces in \\boxed{}")
    if not scan.contents:
        return FormatResult(0.0, None, f"no \\boxed{{}} answer after {THINK_END}")
    answer = scan.contents[-1].strip()
    if not answer:
        return FormatResult(0.0, None, "empty \\boxed{}")
    return FormatResult(1.0, answer, "ok")


def format_reward(completion: str, think_opened_by_prompt: bool = True) -> float:
    """r_format of Eq. 7: 1.0 for a well-formed completion, else 0.0."""
    return check_format(completion, think_opened_by_prompt).score
