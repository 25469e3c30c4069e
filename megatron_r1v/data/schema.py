"""JSON Lines schemas for prompts (GRPO), preference pairs (MPO), scored responses and SFT
conversations, with validation.

One JSON object per line; blank lines are ignored.

    prompts:     {"id", "images": [...], "question", "answer",
                  "answer_type": "number"|"choice"|"expression"|"text", "choices"?: [...]}
    preferences: {"id", "images": [...], "prompt", "chosen", "rejected",
                  "chosen_score"?, "rejected_score"?}
    scored:      {"id", "images": [...], "prompt",
                  "responses": [{"text": str, "score": number}, ...]}
    sft:         {"id", "images": [...],
                  "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

Conventions:

- ``id`` is a string or an integer; integers are normalized to their decimal string, so
  ``1`` and ``"1"`` are the same id (and a duplicate). Ids are unique within a file.
- ``images`` lists paths relative to the folder that holds the JSONL file; absolute
  paths and paths with ``..`` are allowed and resolved (lexically, symlinks are kept).
  An empty list is a text-only sample.
- ``<image>`` in the question / prompt marks where each image goes, the i-th placeholder
  for ``images[i]``. If the text holds any, their number must equal ``len(images)``; if it
  holds none, the images are placed before the text, in order (InternVL's rule, the one
  ``data.template`` applies).
- A ``choice`` question lists its options in ``choices`` (2 to 26 distinct strings) and
  its ``answer`` is the uppercase letter of the correct option: "A" for ``choices[0]``,
  "B" for ``choices[1]``... The question text is shown to the model as written, so it
  should list the options with their letters itself. ``choices`` is an error for the
  other answer types.
- For ``answer_type`` "number" the answer may be a JSON number; it is kept as a string.
- Scores are finite numbers (not booleans); when both are given, ``chosen_score`` must
  not be below ``rejected_score``.
- ``scored`` holds the sampled responses of one prompt with their rewards, the input of
  MPO pair construction (``data.pairs``): at least one response, each an object with
  exactly ``text`` and ``score``. Problems name the entry, e.g. ``responses[2]: missing
  field 'score'``. Repeated texts are allowed (sampling repeats itself).
- ``sft`` is one conversation for supervised fine-tuning: an optional ``system`` message
  first (it replaces the template's system prompt), then ``user`` and ``assistant`` turns
  alternating, starting with a user turn and ending with an assistant turn (the loss is
  on every assistant turn; a trailing user turn would have nothing to train on). Each
  entry has exactly ``role`` and ``content`` (non-empty text). ``<image>`` placeholders go
  in user turns only; their count over all user turns must equal ``len(images)`` (the
  i-th for ``images[i]``), and with none the images go before the first user turn's text.

Every problem is reported as ``FILE:LINE: message`` and a file is read to the end, so one
run lists them all. ``load_records`` turns them into a :class:`DataError` or, with
``on_bad_sample="skip"``, drops the bad records with a warning that lists each problem.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, Union

from .images import DEFAULT_MAX_PIXELS, check_image
from .tokenizer import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START

logger = logging.getLogger(__name__)

Kind = Literal["prompts", "preferences", "scored", "sft"]
KINDS: tuple[str, ...] = ("prompts", "preferences", "scored", "sft")
ANSWER_TYPES: tuple[str, ...] = ("number", "choice", "expression", "text")
IMAGE_PLACEHOLDER = "<image>"
# Written literally in a text, these would add or remove image tokens or chat turns.
RESERVED_TEXT = (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)
CHOICE_LETTERS = string.ascii_uppercase
DEFAULT_MAX_IMAGES = 8
# A DataError lists this many problems; the validator CLI lists all of them.
MAX_PROBLEMS_IN_ERROR = 20

_REQUIRED = {
    "prompts": ("id", "images", "question", "answer", "answer_type"),
    "preferences": ("id", "images", "prompt", "chosen", "rejected"),
    "scored": ("id", "images", "prompt", "responses"),
    "sft": ("id", "images", "messages"),
}
_OPTIONAL = {"prompts": ("choices",), "preferences": ("chosen_score", "rejected_score"), "scored": (), "sft": ()}
# The fields of one entry of a scored record's ``responses``; both required.
_RESPONSE_FIELDS = ("text", "score")
# The fields of one entry of an SFT record's ``messages`` (both required), and its roles.
_MESSAGE_FIELDS = ("role", "content")
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    images: tuple[Path, ...]  # resolved against the JSONL file's folder
    question: str
    answer: str
    answer_type: str
    choices: Optional[tuple[str, ...]]


@dataclass(frozen=True)
class PreferenceRecord:
    id: str
    images: tuple[Path, ...]
    prompt: str
    chosen: str
    rejected: str
    chosen_score: Optional[float]
    rejected_score: Optional[float]


@dataclass(frozen=True)
class ScoredResponse:
    """One sampled response and its reward (any scale: MPO margins are in its units)."""

    text: str
    score: float


@dataclass(frozen=True)
class ScoredRecord:
    """A prompt with its sampled responses in file order (order breaks score ties)."""

    id: str
    images: tuple[Path, ...]
    prompt: str
    responses: tuple[ScoredResponse, ...]


@dataclass(frozen=True)
class Message:
    """One turn of an SFT conversation."""

    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class SFTRecord:
    """A conversation whose assistant turns are the SFT targets (rules in the module docstring)."""

    id: str
    images: tuple[Path, ...]
    messages: tuple[Message, ...]


Record = Union[PromptRecord, PreferenceRecord, ScoredRecord, SFTRecord]


@dataclass(frozen=True)
class Problem:
    path: str  # the JSONL file as the caller named it, so messages match what they typed
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class DataError(ValueError):
    """A data file with problems; ``problems`` holds all of them."""

    def __init__(self, message: str, problems: tuple[Problem, ...] = ()):
        super().__init__(message)
        self.problems = problems


class Loaded(NamedTuple):
    records: list[Record]
    skipped: int


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    # bool before int: bool is an int subclass.
    for python_type, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                              (list, "array"), (dict, "object")):
        if isinstance(value, python_type):
            return name
    return type(value).__name__


class _DuplicateKeys(dict):
    """A JSON object that remembers repeated keys (json keeps the last one silently)."""

    duplicates: list[str]


def _object_hook(pairs: list[tuple[str, Any]]) -> _DuplicateKeys:
    obj = _DuplicateKeys()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj and key not in obj.duplicates:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; other JSON readers do not.
    raise ValueError(f"{name} is not valid JSON")


class _RecordChecker:
    """Checks the fields of one parsed line; ``errors`` collects the messages."""

    def __init__(
        self, obj: dict, kind: str, base: Path, max_images: int, image_check: Callable[[Path], Optional[str]]
    ):
        self.obj, self.kind, self.base = obj, kind, base
        self.max_images, self.image_check = max_images, image_check
        self.errors: list[str] = []

    def text(self, name: str) -> Optional[str]:
        return self._text_value(name, self.obj.get(name))

    def _text_value(self, name: str, value: Any) -> Optional[str]:
        if not isinstance(value, str):
            self.errors.append(f"{name}: expected a string, got {_json_type(value)}")
            return None
        if not value.strip():
            self.errors.append(f"{name}: empty text")
            return None
        reserved = [token for token in RESERVED_TEXT if token in value]
        if reserved:
            self.errors.append(f"{name}: contains the special token(s) {', '.join(reserved)} as text")
            return None
        return value

    def record_id(self) -> Optional[str]:
        value = self.obj.get("id")
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            self.errors.append(f"id: expected a string or an integer, got {_json_type(value)}")
            return None
        if not value.strip():
            self.errors.append("id: empty text")
            return None
        return value

    def images(self) -> Optional[tuple[Path, ...]]:
        value = self.obj.get("images")
        if not isinstance(value, list):
            self.errors.append(f"images: expected an array of paths, got {_json_type(value)}")
            return None
        if len(value) > self.max_images:
            self.errors.append(f"images: {len(value)} images exceed the limit of {self.max_images} (max_images)")
        paths: list[Path] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                got = "empty text" if isinstance(item, str) else _json_type(item)
                self.errors.append(f"images[{i}]: expected a non-empty path string, got {got}")
                continue
            # abspath, not resolve(): normalizes ".." without replacing symlinked folders
            # by their targets, so messages show the paths users know.
            resolved = Path(os.path.abspath(self.base / item))
            reason = self.image_check(resolved)
            if reason is not None:
                self.errors.append(f"images[{i}]: {item!r} ({resolved}): {reason}")
            paths.append(resolved)
        return tuple(paths) if len(paths) == len(value) else None

    def placeholders(self, field: str, text: Optional[str], images: Optional[tuple[Path, ...]]) -> None:
        if text is None or images is None:
            return
        count = text.count(IMAGE_PLACEHOLDER)
        if count and count != len(images):
            self.errors.append(
                f"{field}: {count} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s); "
                f"use one per image, or none to put the images before the text"
            )

    def score(self, name: str) -> Optional[float]:
        """An optional score: None when absent."""
        value = self.obj.get(name)
        if value is None:
            return None
        return self._score_value(name, value)

    def _score_value(self, name: str, value: Any) -> Optional[float]:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.errors.append(f"{name}: expected a number, got {_json_type(value)}")
            return None
        if not math.isfinite(value):
            self.errors.append(f"{name}: expected a finite number, got {value}")
            return None
        return float(value)

    def responses(self) -> Optional[tuple[ScoredResponse, ...]]:
        """The ``responses`` of a scored record; None if any entry has a problem."""
        value = self.obj.get("responses")
        if not isinstance(value, list):
            self.errors.append(f"responses: expected a non-empty array of {{\"text\", \"score\"}} objects, "
                               f"got {_json_type(value)}")
            return None
        if not value:
            self.errors.append("responses: empty array; a scored record needs at least one response")
            return None
        parsed: list[ScoredResponse] = []
        for i, entry in enumerate(value):
            where = f"responses[{i}]"
            if not isinstance(entry, dict):
                self.errors.append(f"{where}: expected an object with 'text' and 'score', got {_json_type(entry)}")
                continue
            before = len(self.errors)
            self._nested_fields(where, entry, _RESPONSE_FIELDS)
            text = self._text_value(f"{where}.text", entry["text"]) if "text" in entry else None
            # Unlike chosen_score / rejected_score a response score is required, so null is an error.
            score = self._score_value(f"{where}.score", entry["score"]) if "score" in entry else None
            if len(self.errors) == before:
                parsed.append(ScoredResponse(text, score))
        return tuple(parsed) if len(parsed) == len(value) else None

    def _nested_fields(self, where: str, entry: dict, fields: tuple[str, ...]) -> None:
        """Duplicate, unknown (with a close match as a hint) and missing keys of a nested object."""
        for key in getattr(entry, "duplicates", ()):
            self.errors.append(f"{where}: field {key!r} appears more than once")
        for key in entry:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.errors.append(f"{where}: unknown field {key!r}{hint}")
        for key in fields:
            if key not in entry:
                self.errors.append(f"{where}: missing field {key!r}")

    def messages(self, images: Optional[tuple[Path, ...]]) -> Optional[tuple[Message, ...]]:
        """The ``messages`` of an SFT record; None if any entry or the turn order has a problem."""
        value = self.obj.get("messages")
        if not isinstance(value, list) or not value:
            got = "an empty array" if isinstance(value, list) else _json_type(value)
            self.errors.append(f"messages: expected a non-empty array of {{\"role\", \"content\"}} objects, got {got}")
            return None
        parsed = [self._message(i, entry) for i, entry in enumerate(value)]
        if any(m is None for m in parsed):
            return None
        before = len(self.errors)
        self._turn_order(parsed)
        placeholders = 0
        for i, message in enumerate(parsed):
            if message.role == "user":
                placeholders += message.content.count(IMAGE_PLACEHOLDER)
            elif IMAGE_PLACEHOLDER in message.content:
                self.errors.append(f"messages[{i}].content: {IMAGE_PLACEHOLDER} placeholders go in user turns only "
                                   f"(this is the {message.role} message)")
        if images is not None and placeholders and placeholders != len(images):
            self.errors.append(f"messages: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the user turns but "
                               f"{len(images)} image(s); use one per image, or none to put the images before the "
                               "first user turn's text")
        return tuple(parsed) if len(self.errors) == before else None

    def _message(self, i: int, entry: Any) -> Optional[Message]:
        where = f"messages[{i}]"
        if not isinstance(entry, dict):
            self.errors.append(f"{where}: expected an object with 'role' and 'content', got {_json_type(entry)}")
            return None
        before = len(self.errors)
        self._nested_fields(where, entry, _MESSAGE_FIELDS)
        role = entry.get("role")
        if "role" in entry and role not in ROLES:
            shown = repr(role) if isinstance(role, str) else _json_type(role)
            self.errors.append(f"{where}.role: {shown} is not one of {', '.join(repr(r) for r in ROLES)}")
        content = self._text_value(f"{where}.content", entry["content"]) if "content" in entry else None
        return Message(role, content) if len(self.errors) == before else None

    def _turn_order(self, messages: list[Message]) -> None:
        """[system], user, assistant, user, assistant, ..., ending with an assistant turn."""
        start = 1 if messages[0].role == "system" else 0
        for i, message in enumerate(messages[start:], start):
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if message.role == "system":
                self.errors.append(f"messages[{i}].role: 'system' is allowed only as the first message")
            elif message.role != expected:
                after = "after an optional system message" if i == start else f"after the {messages[i - 1].role} turn"
                article = "an" if expected == "assistant" else "a"
                self.errors.append(f"messages[{i}].role: expected {article} {expected} turn {after}, got "
                                   f"{message.role!r} (turns alternate user, assistant, ...)")
            else:
                continue
            return
        if not any(m.role == "assistant" for m in messages):
            self.errors.append("messages: no assistant turn; an SFT conversation needs one to train on")
        elif messages[-1].role != "assistant":
            self.errors.append(f"messages[{len(messages) - 1}].role: the last message must be an assistant turn, got "
                               f"{messages[-1].role!r} (a trailing user turn has nothing to train on)")

    def answer(self, answer_type: Optional[str]) -> Optional[str]:
        value = self.obj.get("answer")
        if answer_type == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                self.errors.append(f"answer: expected a finite number, got {value}")
                return None
            return str(value)
        return self.text("answer")

    def answer_type(self) -> Optional[str]:
        value = self.obj.get("answer_type")
        if not isinstance(value, str):
            self.errors.append(f"answer_type: expected a string, got {_json_type(value)}")
            return None
        if value not in ANSWER_TYPES:
            allowed = ", ".join(repr(t) for t in ANSWER_TYPES)
            self.errors.append(f"answer_type: {value!r} is not one of {allowed}")
            return None
        return value

    def choices(self, answer_type: Optional[str], answer: Optional[str]) -> Optional[tuple[str, ...]]:
        value = self.obj.get("choices")
        if answer_type is None:  # already reported; which rule applies is unknown
            return None
        if answer_type != "choice":
            if value is not None:
                self.errors.append(f"choices: only allowed with answer_type 'choice', not {answer_type!r}")
            return None
        if value is None:
            self.errors.append("missing field 'choices' (required when answer_type is 'choice')")
            return None
        if not isinstance(value, list):
            self.errors.append(f"choices: expected an array of strings, got {_json_type(value)}")
            return None
        if not 2 <= len(value) <= len(CHOICE_LETTERS):
            self.errors.append(f"choices: {len(value)} choice(s); a choice question needs 2 to {len(CHOICE_LETTERS)}")
            return None
        ok = True
        first_index: dict[str, int] = {}
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                got = "empty text" if isinstance(item, str) else _json_type(item)
                self.errors.append(f"choices[{i}]: expected a non-empty string, got {got}")
                ok = False
            elif item.strip() in first_index:
                self.errors.append(f"choices[{i}]: {item!r} repeats choices[{first_index[item.strip()]}]")
                ok = False
            else:
                first_index[item.strip()] = i
        if not ok:
            return None
        letters = CHOICE_LETTERS[: len(value)]
        if answer is not None and answer not in letters:
            hint = ""
            if answer.strip() in first_index:
                hint = f" ({answer!r} is choice {letters[first_index[answer.strip()]]})"
            self.errors.append(
                f"answer: {answer!r} is not a choice letter {letters[0]}-{letters[-1]}; the answer of a "
                f"choice question is the letter of the correct choice{hint}"
            )
        return tuple(value)


def _check_fields(obj: dict, kind: str, checker: _RecordChecker) -> None:
    allowed = _REQUIRED[kind] + _OPTIONAL[kind]
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            checker.errors.append(f"unknown field {key!r}{hint}")
    for key in _REQUIRED[kind]:
        if key not in obj:
            checker.errors.append(f"missing field {key!r}")


def _parse_record(obj: dict, kind: str, checker: _RecordChecker) -> tuple[Optional[str], Optional[Record]]:
    """(normalized id or None, the record if the line has no problem)."""
    _check_fields(obj, kind, checker)
    record_id = checker.record_id() if "id" in obj else None
    images = checker.images() if "images" in obj else None
    record: Optional[Record] = None
    if kind == "prompts":
        question = checker.text("question") if "question" in obj else None
        answer_type = checker.answer_type() if "answer_type" in obj else None
        answer = checker.answer(answer_type) if "answer" in obj else None
        choices = checker.choices(answer_type, answer)
        checker.placeholders("question", question, images)
        if not checker.errors:
            record = PromptRecord(record_id, images, question, answer, answer_type, choices)
    elif kind == "scored":
        prompt = checker.text("prompt") if "prompt" in obj else None
        responses = checker.responses() if "responses" in obj else None
        checker.placeholders("prompt", prompt, images)
        if not checker.errors:
            record = ScoredRecord(record_id, images, prompt, responses)
    elif kind == "sft":
        messages = checker.messages(images) if "messages" in obj else None
        if not checker.errors:
            record = SFTRecord(record_id, images, messages)
    else:
        prompt = checker.text("prompt") if "prompt" in obj else None
        chosen = checker.text("chosen") if "chosen" in obj else None
        rejected = checker.text("rejected") if "rejected" in obj else None
        chosen_score, rejected_score = checker.score("chosen_score"), checker.score("rejected_score")
        checker.placeholders("prompt", prompt, images)
        if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
            checker.errors.append("chosen and rejected are the same text")
        if chosen_score is not None and rejected_score is not None and chosen_score < rejected_score:
            checker.errors.append(
                f"chosen_score {chosen_score:g} is below rejected_score {rejected_score:g} (pair swapped?)"
            )
        if not checker.errors:
            record = PreferenceRecord(record_id, images, prompt, chosen, rejected, chosen_score, rejected_score)
    return record_id, record


def _json_object(raw: bytes, number: int) -> tuple[Optional[dict], Optional[str]]:
    """(the JSON object of line ``number``, or None; what is wrong with the line, or None).
    Blank lines give (None, None)."""
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM from some editors
        raw = raw[3:]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"not valid UTF-8: {err.reason} at byte {err.start + 1} of the line"
    if not line.strip():
        return None, None
    try:
        obj = json.loads(line, object_pairs_hook=_object_hook, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        # json says "Unterminated string starting at" and gives the position apart.
        return None, f"invalid JSON at column {err.colno}: {err.msg.removesuffix(' at')}"
    except ValueError as err:
        return None, f"invalid JSON: {err}"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {_json_type(obj)}"
    return obj, None


def read_records(
    path: Union[str, Path],
    kind: Kind,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    check_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    checked: Optional[Mapping[Path, Optional[str]]] = None,
) -> tuple[list[Record], list[Problem]]:
    """Reads the whole file: (records without problems, every problem found).

    ``check_images=False`` skips decoding the images (fast, for huge sets whose images
    were checked before); paths are still resolved. ``checked`` holds images already
    checked elsewhere (resolved path -> reason, None when fine; e.g. by other ranks of a
    training run, ``data.replica_tiling.check_images_once``): only the others are decoded.
    A file that cannot be opened raises OSError naming it.
    """
    # Several records often share an image (a prompt's preference pairs); decode it once.
    image_reasons: dict[Path, Optional[str]] = dict(checked or {})

    def image_check(image: Path) -> Optional[str]:
        if not check_images:
            return None
        if image not in image_reasons:
            image_reasons[image] = check_image(image, max_pixels)
        return image_reasons[image]

    return _read(path, kind, max_images, image_check)


def referenced_images(path: Union[str, Path], kind: Kind, *, max_images: int = DEFAULT_MAX_IMAGES) -> list[Path]:
    """Every image path the file's records name (resolved; records with problems too), in
    first-seen order, without decoding any."""
    seen: dict[Path, None] = {}

    def collect(image: Path) -> Optional[str]:
        seen.setdefault(image)
        return None

    _read(path, kind, max_images, collect)
    return list(seen)


def _read(path: Union[str, Path], kind: Kind, max_images: int,
          image_check: Callable[[Path], Optional[str]]) -> tuple[list[Record], list[Problem]]:
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(repr(k) for k in KINDS)}")
    shown = str(path)
    path = Path(path)
    base = Path(os.path.abspath(path)).parent
    data = path.read_bytes()
    records: list[Record] = []
    problems: list[Problem] = []
    first_line_of_id: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        obj, problem = _json_object(raw, number)
        if problem is not None:
            problems.append(Problem(shown, number, problem))
        if obj is None:
            continue
        checker = _RecordChecker(obj, kind, base, max_images, image_check)
        for key in obj.duplicates:
            checker.errors.append(f"field {key!r} appears more than once")
        record_id, record = _parse_record(obj, kind, checker)
        if record_id is not None:
            if record_id in first_line_of_id:
                checker.errors.append(f"duplicate id {record_id!r} (first on line {first_line_of_id[record_id]})")
                record = None
            else:
                first_line_of_id[record_id] = number
        problems.extend(Problem(shown, number, message) for message in checker.errors)
        if record is not None and not checker.errors:
            records.append(record)
    return records, problems


def load_records(
    path: Union[str, Path],
    kind: Kind,
    on_bad_sample: Literal["error", "skip"] = "error",
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    check_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    checked: Optional[Mapping[Path, Optional[str]]] = None,
) -> Loaded:
    """The valid records of ``path`` and how many bad ones were skipped.

    ``on_bad_sample="error"`` raises :class:`DataError` if any line has a problem;
    ``"skip"`` drops bad lines and logs one warning with the count and every problem.
    A file with no valid record at all is an error under both policies.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample: {on_bad_sample!r} is not one of 'error', 'skip'")
    records, problems = read_records(
        path, kind, max_images=max_images, check_images=check_images, max_pixels=max_pixels, checked=checked
    )
    bad_lines = len({p.line for p in problems})
    hint = f"run `python -m megatron_r1v.data.validate {path} --kind {kind}` to list them all"
    if problems and on_bad_sample == "error":
        listed = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS_IN_ERROR])
        more = len(problems) - MAX_PROBLEMS_IN_ERROR
        tail = f"\n  ... and {more} more; {hint}" if more > 0 else ""
        raise DataError(
            f"{path}: {len(problems)} problem(s) in {bad_lines} record(s) "
            f"(on_bad_sample='error'; 'skip' drops them):\n{listed}{tail}",
            tuple(problems),
        )
    if problems:
        listed = "\n".join(f"  {p}" for p in problems)
        logger.warning(
            "%s: skipped %d of %d %s record(s) with %d problem(s) (on_bad_sample='skip'):\n%s",
            path, bad_lines, bad_lines + len(records), kind, len(problems), listed,
        )
    if not records:
        raise DataError(f"{path}: no valid {kind} records", tuple(problems))
    return Loaded(records, bad_lines)
