"""Checks prompts, preferences, scored and SFT JSONL files; lists every problem as ``FILE:LINE: message``.

    python -m megatron_r1v.data.validate FILE.jsonl [FILE2 ...] --kind prompts|preferences|scored|sft
        [--max-images N] [--no-image-check]

Exit status: 0 when every file is clean, 1 when any problem was found, 2 for usage
errors (a file that does not exist or cannot be read, bad arguments). The rules are in
``megatron_r1v.data.schema``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, TextIO

from .schema import DEFAULT_MAX_IMAGES, KINDS, read_records

PROG = "python -m megatron_r1v.data.validate"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE.jsonl")
    parser.add_argument("--kind", required=True, choices=KINDS, help="which schema the files follow")
    parser.add_argument("--max-images", type=_positive_int, default=DEFAULT_MAX_IMAGES,
                        help=f"most images one record may have (default {DEFAULT_MAX_IMAGES})")
    parser.add_argument("--no-image-check", action="store_true",
                        help="do not open the images (fast; paths are not checked either)")
    return parser


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    out = sys.stdout if out is None else out
    parser = build_parser()
    args = parser.parse_args(argv)
    # Usage errors first, so a typo in the second file name does not cost a long run
    # over the first one.
    unreadable = [f"{f}: no such file" if not f.exists() else f"{f}: not a regular file"
                  for f in args.files if not f.is_file()]
    if unreadable:
        parser.print_usage(sys.stderr)
        for message in unreadable:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

    total_read = total_valid = total_problems = 0
    for path in args.files:
        try:
            records, problems = read_records(
                path, args.kind, max_images=args.max_images, check_images=not args.no_image_check
            )
        except OSError as err:
            print(f"{PROG}: error: {path}: {err.strerror or err}", file=sys.stderr)
            return 2
        for problem in problems:
            print(problem, file=out)
        bad_lines = len({p.line for p in problems})
        read = len(records) + bad_lines
        print(f"{path}: {read} {args.kind} record(s) read, {len(records)} valid, "
              f"{len(problems)} problem(s) in {bad_lines} record(s)", file=out)
        total_read += read
        total_valid += len(records)
        total_problems += len(problems)
    if len(args.files) > 1:
        print(f"total: {len(args.files)} files, {total_read} record(s) read, {total_valid} valid, "
              f"{total_problems} problem(s)", file=out)
    return 1 if total_problems else 0


if __name__ == "__main__":
    sys.exit(main())
