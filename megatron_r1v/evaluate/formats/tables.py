"""Rows of a benchmark file, whatever its container, and typed checks of their fields.

Every reader of ``evaluate.formats`` goes through here:

- :func:`read_rows` yields one :class:`Row` per record of a ``.json`` file (a list of
  objects, or an object of objects keyed by id as MathVista's ``testmini.json``; a
  ``.json`` file holding one object per line is read as JSON Lines, as some exports write
  it), a ``.jsonl`` / ``.ndjson`` file, a ``.parquet`` file, a folder of parquet files
  (searched recursively, in sorted order: MMMU's ``<Subject>/validation-*.parquet``) or a
  glob pattern (``MMMU/*/validation-*.parquet``, to leave out the other splits).
- Each row has a location for messages: ``FILE:LINE`` (JSON, the line where the record
  starts) or ``FILE:row N`` (parquet; N counts from 0, as pandas and ``datasets`` index).
- :class:`Fields` reads a row's fields with their types checked and records every problem
  as ``LOCATION: FIELD: message`` in the :class:`Reading`, so one read lists them all.
- Image cells follow the HF ``datasets`` parquet layout: a struct ``{"bytes", "path"}``
  (bytes may be null with a path), a plain path string, or null. Bytes become an
  :class:`~megatron_r1v.data.images.EmbeddedImage` named ``LOCATION:COLUMN``; paths are
  resolved against the data file's folder and only checked to exist (decoding is the
  tilers' job, which raise ImageError naming the source). Nothing is written anywhere.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from megatron_r1v.data.images import EmbeddedImage, ImageSource
from megatron_r1v.data.schema import IMAGE_PLACEHOLDER, RESERVED_TEXT
from megatron_r1v.evaluate.items import EvalItem

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
MAX_LISTED_PROBLEMS = 20
# Rows converted to Python objects at a time: bounds the memory of big image columns.
_PARQUET_BATCH_ROWS = 64
_GLOB_CHARS = frozenset("*?[")


class BenchmarkDataError(ValueError):
    """A benchmark file with problems; ``problems`` holds every one, in reading order, as
    ``FILE:LINE: message`` or ``FILE:row N: column: message``."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems)

    @classmethod
    def listing(cls, what: str, problems: Sequence[str]) -> "BenchmarkDataError":
        """The error for ``problems`` of ``what`` (a path and a benchmark name), the first
        :data:`MAX_LISTED_PROBLEMS` in the message."""
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        return cls(f"{what}: {len(problems)} problem(s):\n{listed}{tail}", problems)


class Reading:
    """What one read of a benchmark collects: its problems, and the embedded image bytes
    seen so far (POPE repeats each image in ~18 rows; identical bytes are kept once)."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._blobs: dict[bytes, bytes] = {}

    def add(self, location: str, message: str) -> None:
        self.problems.append(f"{location}: {message}")

    def shared(self, data: bytes) -> bytes:
        """``data``, or an equal bytes object seen before (so duplicates are freed)."""
        return self._blobs.setdefault(data, data)


@dataclass(frozen=True)
class Row:
    """One record of a benchmark file."""

    location: str
    """``FILE:LINE`` or ``FILE:row N``: where messages point."""
    values: Mapping[str, Any]
    """Field / column name -> value (parquet structs as dicts, lists as lists)."""
    file: str
    """The file as the user named it (a folder's or pattern's files joined to it)."""
    folder: Path
    """Absolute folder of the file: image paths are resolved against it."""
    number: int
    """The line number (JSON, from 1) or row index (parquet, from 0): an id of last resort."""
    key: Optional[str] = None
    """The record's key in an object-of-objects JSON file (MathVista's pid); None otherwise."""


def type_name(value: Any) -> str:
    """JSON-style name of a value's type, for "expected X, got Y" messages."""
    if value is None:
        return "null"
    for python_type, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                              (bytes, "bytes"), (list, "array"), (dict, "object")):
        if isinstance(value, python_type):
            return name
    return type(value).__name__


def is_number(text: str) -> bool:
    """Whether ``text`` is one finite plain number ("42", "-1.5", "1e3"; not "1/2", "nan")."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# --- files --------------------------------------------------------------------------------


def table_files(path: Path) -> list[Path]:
    """The files ``path`` names: itself, the parquet files under a folder (sorted), or a
    glob pattern's matches (sorted). FileNotFoundError naming ``path`` when there are none."""
    if path.is_dir():
        found = sorted((p for p in path.rglob("*") if p.suffix in PARQUET_SUFFIXES and p.is_file()),
                       key=lambda p: p.relative_to(path).as_posix())
        if not found:
            raise FileNotFoundError(f"{path}: a folder without .parquet files (a folder is read as parquet files)")
        return found
    if path.exists():
        return [path]
    if _GLOB_CHARS.intersection(str(path)):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"{path}: no file matches this pattern")
        return matches
    raise FileNotFoundError(f"{path}: no such file or folder")


def read_rows(path: Path, reading: Reading, required_columns: Sequence[str] = ()) -> Iterator[Row]:
    """Every row of ``path`` (a file, a folder of parquet files or a glob pattern) in order.

    Problems of the container (invalid JSON, an empty file, a parquet file without one of
    ``required_columns``, an unknown extension) go to ``reading``; a JSON document is read
    up to its first syntax error, a JSON Lines file to its end.
    """
    for file in table_files(path):
        shown = str(file)
        suffix = file.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            yield from _parquet_rows(file, shown, reading, required_columns)
        elif suffix in JSON_SUFFIXES + JSONL_SUFFIXES:
            text = _read_text(file, shown, reading)
            if text is None:
                continue
            if not text.strip():
                reading.add(shown, "empty file")
            elif suffix in JSONL_SUFFIXES:
                yield from _jsonl_rows(text, shown, _folder(file), reading)
            else:
                yield from _json_rows(text, shown, _folder(file), reading)
        else:
            known = ", ".join(JSON_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)
            reading.add(shown, f"unknown file type {file.suffix or '(no extension)'!r}; expected one of {known}")


def _folder(file: Path) -> Path:
    # abspath, not resolve(): keeps symlinked folders as the user knows them.
    return Path(os.path.abspath(file)).parent


def _read_text(file: Path, shown: str, reading: Reading) -> Optional[str]:
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM is tolerated, as editors on Windows write one
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        reading.add(f"{shown}:{line}", f"not UTF-8 text ({err.reason} at byte {err.start})")
        return None


def _jsonl_rows(text: str, shown: str, folder: Path, reading: Reading) -> Iterator[Row]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        location = f"{shown}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            reading.add(location, f"invalid JSON at column {err.colno}: {err.msg}")
            continue
        if not isinstance(value, dict):
            reading.add(location, f"expected a JSON object, got {type_name(value)}")
            continue
        yield Row(location, value, shown, folder, number)


def _json_rows(text: str, shown: str, folder: Path, reading: Reading) -> Iterator[Row]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            # One object per line in a .json file: JSON Lines under another name.
            yield from _jsonl_rows(text, shown, folder, reading)
        else:
            reading.add(f"{shown}:{err.lineno}", f"invalid JSON at column {err.colno}: {err.msg}")
        return
    if not isinstance(document, (list, dict)):
        reading.add(f"{shown}:1", f"expected a JSON array of objects or an object of objects, got "
                                  f"{type_name(document)}")
        return
    # json.loads keeps no positions; a second pass over the (now known valid) text finds
    # the line where each record starts, for messages.
    for line, key, value in _members(text, isinstance(document, dict)):
        location = f"{shown}:{line}"
        if not isinstance(value, dict):
            reading.add(location, f"expected a JSON object, got {type_name(value)}")
            continue
        yield Row(location, value, shown, folder, line, key)


def _members(text: str, is_object: bool) -> Iterator[tuple[int, Optional[str], Any]]:
    """(line, key, value) of each member of the valid JSON array / object ``text``."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0) + 1  # past the opening bracket
    line, counted = 1, 0  # newlines are counted incrementally: one pass over the text
    while True:
        pos = _skip_space(text, pos)
        if text[pos] in "]}":
            return
        line, counted = line + text.count("\n", counted, pos), pos
        key: Optional[str] = None
        if is_object:
            key, pos = decoder.raw_decode(text, pos)
            pos = _skip_space(text, _skip_space(text, pos) + 1)  # past the colon
        value, pos = decoder.raw_decode(text, pos)
        yield line, key, value
        pos = _skip_space(text, pos)
        if text[pos] == ",":
            pos += 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parquet_rows(file: Path, shown: str, reading: Reading, required_columns: Sequence[str]) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as err:
        reading.add(shown, f"cannot read as parquet: {err}")
        return
    names = parquet.schema_arrow.names
    missing = [c for c in required_columns if c not in names]
    if missing:
        reading.add(shown, f"missing column(s) {', '.join(repr(c) for c in missing)} (columns: {', '.join(names)})")
        return
    folder, index = _folder(file), 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for values in batch.to_pylist():
            yield Row(f"{shown}:row {index}", values, shown, folder, index)
            index += 1


# --- fields -------------------------------------------------------------------------------


class Fields:
    """Typed reads of one row's fields. A problem is recorded as ``LOCATION: FIELD: message``
    and the read returns None; :attr:`ok` says whether the row has had none so far."""

    def __init__(self, row: Row, reading: Reading):
        self.row = row
        self.reading = reading
        self._problems_before = len(reading.problems)
        self.item: Optional[str] = None
        """The row's id once read: image problems name the item."""

    @property
    def ok(self) -> bool:
        return len(self.reading.problems) == self._problems_before

    def problem(self, name: str, message: str) -> None:
        self.reading.add(self.row.location, f"{name}: {message}" if name else message)

    def given(self, name: str) -> bool:
        """Whether the field is present and not null."""
        return self.row.values.get(name) is not None

    def value(self, name: str, optional: bool, expected: str) -> Any:
        """The value, or None (with a problem unless ``optional``) when missing or null."""
        if name not in self.row.values:
            if not optional:
                self.problem(name, "missing field")
            return None
        value = self.row.values[name]
        if value is None and not optional:
            self.problem(name, f"expected {expected}, got null")
        return value

    def text(self, name: str, *, optional: bool = False, empty_ok: bool = False) -> Optional[str]:
        """A string without reserved chat / image tokens; empty only with ``empty_ok``."""
        value = self.value(name, optional, "a string")
        if value is None:
            return None
        return self.check_text(name, value, empty_ok)

    def check_text(self, name: str, value: Any, empty_ok: bool = False) -> Optional[str]:
        """``value`` when it is a usable string (the :meth:`text` rules), else None."""
        if not isinstance(value, str):
            self.problem(name, f"expected a string, got {type_name(value)}")
            return None
        if not empty_ok and not value.strip():
            self.problem(name, "empty text")
            return None
        reserved = [token for token in RESERVED_TEXT if token in value]
        if reserved:
            self.problem(name, f"contains the special token(s) {', '.join(reserved)} as text")
            return None
        return value

    def item_id(self, name: str) -> Optional[str]:
        """A non-empty string or an integer (kept as its decimal string)."""
        value = self.value(name, False, "a string or an integer")
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if value is not None and not isinstance(value, str):
            self.problem(name, f"expected a string or an integer, got {type_name(value)}")
            return None
        return None if value is None else self.check_text(name, value)

    def one_of(self, name: str, allowed: Sequence[str], *, optional: bool = False) -> Optional[str]:
        """A string that is one of ``allowed``."""
        value = self.text(name, optional=optional)
        if value is not None and value not in allowed:
            self.problem(name, f"unknown value {value!r}; expected one of {', '.join(repr(a) for a in allowed)}")
            return None
        return value

    def answer(self, name: str) -> Optional[str]:
        """A gold answer: a non-empty string, or a number kept as its shortest text (33, not 33.0)."""
        value = self.value(name, False, "a string or a number")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                self.problem(name, f"expected a finite number, got {value}")
                return None
            return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        return None if value is None else self.check_text(name, value)

    def text_list(self, name: str, *, optional: bool = False) -> Optional[list[str]]:
        """A non-empty array of non-empty strings."""
        value = self.value(name, optional, "an array of strings")
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            self.problem(name, f"expected a non-empty array of strings, got "
                               f"{'an empty array' if value == [] else type_name(value)}")
            return None
        texts = [self.check_text(f"{name}[{i}]", entry) for i, entry in enumerate(value)]
        return None if any(t is None for t in texts) else [t for t in texts if t is not None]

    def number(self, name: str, *, optional: bool = False) -> Optional[float]:
        """A finite number (not a boolean)."""
        value = self.value(name, optional, "a number")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(name, f"expected a number, got {type_name(value)}")
            return None
        if not math.isfinite(value):
            self.problem(name, f"expected a finite number, got {value}")
            return None
        return float(value)

    def flag(self, name: str) -> Optional[bool]:
        """A boolean."""
        value = self.value(name, False, "a boolean")
        if value is not None and not isinstance(value, bool):
            self.problem(name, f"expected a boolean, got {type_name(value)}")
            return None
        return value

    def image(self, name: str, *, required: bool = False) -> Optional[ImageSource]:
        """The image of an image cell (module docstring); None for null or an empty path,
        with a problem when ``required``."""
        cell = self.row.values.get(name)
        data: Any = None
        path: Any = cell
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
        elif cell is not None and not isinstance(cell, str):
            self.problem(name, f"expected an image (a path or a {{bytes, path}} struct), got {type_name(cell)}")
            return None
        if data is not None:
            if not isinstance(data, bytes) or not data:
                got = "empty bytes" if data == b"" else type_name(data)
                self.problem(name, f"expected encoded image bytes, got {got}")
                return None
            return EmbeddedImage(f"{self.row.location}:{name}", self.reading.shared(data))
        if path is None or path == "":
            if required:
                self.problem(name, "missing image" if name in self.row.values else "missing field")
            return None
        if not isinstance(path, str):
            self.problem(name, f"expected an image path string, got {type_name(path)}")
            return None
        resolved = Path(os.path.abspath(self.row.folder / path))
        if not resolved.is_file():
            of_item = f" of item {self.item!r}" if self.item is not None else ""
            self.problem(name, f"image {path!r}{of_item} not found ({resolved})")
            return None
        return resolved


def check_placeholders(fields: Fields, question: str, images: Sequence[ImageSource]) -> None:
    """A prompt's ``<image>`` count must be 0 (images before the text) or one per image."""
    count = question.count(IMAGE_PLACEHOLDER)
    if count and count != len(images):
        fields.problem("question", f"{count} {IMAGE_PLACEHOLDER} placeholder(s) in the prompt but "
                                   f"{len(images)} image(s)")


def strip_dollars(text: str) -> str:
    """``$x$`` / ``$$x$$`` -> ``x``: the math delimiters around a whole gold answer."""
    stripped = text.strip()
    for fence in ("$$", "$"):
        inner = stripped[len(fence):-len(fence)]
        if len(stripped) > 2 * len(fence) and stripped.startswith(fence) and stripped.endswith(fence) \
                and fence not in inner:
            return inner.strip()
    return stripped


def collect(rows: Iterable[Row], reading: Reading, build: Callable[[Fields], Optional[EvalItem]]) -> list[EvalItem]:
    """The items ``build`` makes of ``rows`` (None: skipped, or problems recorded in ``reading``)."""
    items = []
    for row in rows:
        item = build(Fields(row, reading))
        if item is not None:
            items.append(item)
    return items
