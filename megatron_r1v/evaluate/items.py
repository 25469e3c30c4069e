"""The typed record every benchmark reader produces and the runner, the scorers and the
reports consume: one :class:`EvalItem` per question, whatever the file format.

A reader (``evaluate.formats``) turns a benchmark's public file into items: the text the
model is shown (the benchmark's usual instruction applied, ``<image>`` placeholders where
the images go, rendered later by the model's chat template with thinking), the images
(files or :class:`~megatron_r1v.data.images.EmbeddedImage` bytes), and everything the
rule scorer (``evaluate.scoring``) needs: the acceptable gold answers, their kind, the
options of a multiple-choice question, MathVista's precision and unit, OlympiadBench's
tolerance. ``category`` is the key of the result's ``by_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_r1v.data.images import ImageSource

ANSWER_KINDS: tuple[str, ...] = ("choice", "number", "expression", "text", "list", "yes_no")
"""How an item's answer is scored (``evaluate.scoring``):

- ``choice``: ``answers`` holds the correct option's letter ("A" for ``choices[0]``);
  the option letter or the option's text is accepted;
- ``number``: a numeric value; with ``precision``, both sides are rounded to that many
  decimals (MathVista's float answers); with ``tolerance``, an absolute error up to it is
  accepted (OlympiadBench's ``error``); a trailing ``unit`` is ignored;
- ``expression``: math-verify equivalence (LaTeX or plain), MMMU's and OlympiadBench's
  open answers;
- ``text``: normalized exact match;
- ``list``: several values (MathVista ``list``, OlympiadBench ``is_multiple_answer``),
  compared as multisets: the same number of elements, in any order, each matched once
  as a number / expression;
- ``yes_no``: "yes" or "no" (hallucination benchmarks in POPE's format).
"""


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question, ready to prompt and to score."""

    id: str
    """Unique within a benchmark file (MathVista ``pid``, MMMU ``id``, ...)."""
    question: str
    """The user turn's text: the benchmark's instruction applied, ``<image>`` placeholders
    (one per image, in order) or none (the images then go before the text)."""
    images: tuple[ImageSource, ...]
    answers: tuple[str, ...]
    """Acceptable gold answers (any one matching is correct); at least one. MMMU open
    questions and OlympiadBench list several."""
    answer_kind: str
    """One of :data:`ANSWER_KINDS`."""
    category: str
    """The ``by_type`` key: MathVista ``question_type``, MMMU subject, MathVerse
    ``problem_version``, OlympiadBench subject and modality, POPE ``category``..."""
    source: str
    """Where the item is in its file, for messages: ``FILE:LINE`` or ``FILE:row N``."""
    choices: Optional[tuple[str, ...]] = None
    """Option texts in letter order (``choice`` items; None otherwise)."""
    precision: Optional[int] = None
    """Decimals a float answer is compared at (MathVista ``precision``)."""
    unit: Optional[str] = None
    """Unit the answer is given in (MathVista, OlympiadBench); a response may add or omit it."""
    tolerance: Optional[float] = None
    """Absolute error accepted for a ``number`` answer (OlympiadBench ``error``)."""
    raw_question: str = ""
    """The question as the benchmark wrote it, without the instruction (the judge reads it)."""

    def __post_init__(self) -> None:
        # Readers validate their files with FILE:LINE messages; these are internal invariants.
        assert self.answer_kind in ANSWER_KINDS, self.answer_kind
        assert self.answers, f"{self.source}: no gold answer"
        assert self.answer_kind != "choice" or self.choices, f"{self.source}: a choice item without choices"
