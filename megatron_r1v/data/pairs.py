"""MPO preference pairs selected by a reward margin.

Skywork-R1V2 (technical report, section 3.2, Mixed Preference Optimization) trains on
pairs whose reward margin between the chosen and the rejected response exceeds a
threshold, and compares thresholds 7, 10 and 15: a small margin keeps more but noisier
pairs, a large one fewer but clearer ones. This module makes such pairs from two inputs:

- ``scored`` JSONL (``data.schema``): the sampled responses of each prompt with their
  rewards. :func:`build_pairs` takes the best response as chosen and pairs it with the
  lowest-scored responses that are more than ``margin`` below it.
- ``preferences`` JSONL with ``chosen_score`` / ``rejected_score``: ready-made pairs;
  :func:`filter_pairs` keeps those above the margin.

The margin test is strict everywhere: ``chosen_score - rejected_score > margin``.

    python -m megatron_r1v.data.pairs IN.jsonl --format scored|preferences --margin 10 \\
        [--max-pairs-per-prompt 1] --out OUT.jsonl [--force]

writes a ``preferences`` JSONL (image paths relative to OUT's folder) atomically and
prints ``kept K of N pairs (margin > M): D below the margin, S bad records skipped``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence, Union

from megatron_r1v.atomic_dir import write_text_atomic

from .schema import PreferenceRecord, ScoredRecord, load_records

PROG = "python -m megatron_r1v.data.pairs"
Format = Literal["preferences", "scored"]
FORMATS: tuple[str, ...] = ("preferences", "scored")
# Pair ids named in an error about missing scores; the count says how many more.
_IDS_IN_ERROR = 5


@dataclass(frozen=True)
class _Selection:
    """Pairs of one selection and what happened to every candidate pair."""

    pairs: list[PreferenceRecord]
    candidates: int  # chosen/rejected combinations considered
    below_margin: int  # candidates whose margin does not exceed the threshold
    over_cap: int  # above the margin but beyond max_pairs_per_prompt
    score_range: Optional[tuple[float, float]]  # lowest and highest score seen; None without scores
    largest_margin: Optional[float]  # of any candidate; None without scores


@dataclass(frozen=True)
class PairSet:
    """The pairs of one file and the counts behind them, for summaries and errors."""

    records: list[PreferenceRecord]
    prompts: int  # valid input records: prompts (scored) or pairs (preferences)
    total_candidates: int  # candidate pairs before the margin: kept + dropped_margin + dropped_cap
    kept: int
    dropped_margin: int
    dropped_cap: int  # scored only: above the margin but over max_pairs_per_prompt
    skipped_bad: int  # input records with schema problems (on_bad_sample="skip")
    margin: Optional[float]

    def summary(self) -> str:
        """The one-line report of the CLI."""
        threshold = "no margin" if self.margin is None else f"margin > {self.margin:g}"
        cap = f", {self.dropped_cap} over the per-prompt cap" if self.dropped_cap else ""
        return (f"kept {self.kept} of {self.total_candidates} pairs ({threshold}): {self.dropped_margin} below "
                f"the margin{cap}, {self.skipped_bad} bad records skipped")


def _check_margin(margin: float) -> None:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin: expected a finite number, got {margin!r}")


def _span(scores: list[float]) -> Optional[tuple[float, float]]:
    return (min(scores), max(scores)) if scores else None


def _select_scored(records: Sequence[ScoredRecord], margin: float, max_pairs_per_prompt: int) -> _Selection:
    _check_margin(margin)
    if isinstance(max_pairs_per_prompt, bool) or not isinstance(max_pairs_per_prompt, int) \
            or max_pairs_per_prompt < 0:
        raise ValueError(f"max_pairs_per_prompt: expected an integer >= 0 (0 = all), got {max_pairs_per_prompt!r}")
    pairs: list[PreferenceRecord] = []
    candidates = below = over_cap = 0
    scores: list[float] = []
    largest: Optional[float] = None
    seen_ids: set[str] = set()
    for record in records:
        responses = record.responses
        scores.extend(r.score for r in responses)
        # max() returns the first of equal maxima: ties go to file order.
        best = max(range(len(responses)), key=lambda i: responses[i].score)
        chosen = responses[best]
        # A rejected identical to the chosen teaches nothing (and the schema rejects the pair).
        others = sorted((i for i in range(len(responses))
                         if i != best and responses[i].text.strip() != chosen.text.strip()),
                        key=lambda i: (responses[i].score, i))
        eligible = [i for i in others if chosen.score - responses[i].score > margin]
        taken = eligible if max_pairs_per_prompt == 0 else eligible[:max_pairs_per_prompt]
        candidates += len(others)
        below += len(others) - len(eligible)
        over_cap += len(eligible) - len(taken)
        if others:
            # others is sorted lowest score first, so its first entry has the largest margin.
            gap = chosen.score - responses[others[0]].score
            largest = gap if largest is None else max(largest, gap)
        # "#" + digits after the last "#" makes pair ids unique exactly when prompt ids are.
        if record.id in seen_ids:
            raise ValueError(f"prompt id {record.id!r} appears more than once; its pair ids would repeat")
        seen_ids.add(record.id)
        for k, i in enumerate(taken):
            pair_id = f"{record.id}#{k}"
            pairs.append(PreferenceRecord(pair_id, record.images, record.prompt, chosen.text,
                                          responses[i].text, chosen.score, responses[i].score))
    return _Selection(pairs, candidates, below, over_cap, _span(scores), largest)


def _select_preferences(records: Sequence[PreferenceRecord], margin: Optional[float]) -> _Selection:
    scores = [s for r in records for s in (r.chosen_score, r.rejected_score) if s is not None]
    margins = [r.chosen_score - r.rejected_score for r in records
               if r.chosen_score is not None and r.rejected_score is not None]
    largest = max(margins) if margins else None
    if margin is None:
        return _Selection(list(records), len(records), 0, 0, _span(scores), largest)
    _check_margin(margin)
    unscored = [r.id for r in records if r.chosen_score is None or r.rejected_score is None]
    if unscored:
        named = ", ".join(repr(i) for i in unscored[:_IDS_IN_ERROR])
        more = f" and {len(unscored) - _IDS_IN_ERROR} more" if len(unscored) > _IDS_IN_ERROR else ""
        raise ValueError(f"margin {margin:g} needs chosen_score and rejected_score on every pair; "
                         f"{len(unscored)} pair(s) lack them: {named}{more}")
    kept = [r for r in records if r.chosen_score - r.rejected_score > margin]
    return _Selection(kept, len(records), len(records) - len(kept), 0, _span(scores), largest)


def build_pairs(
    records: Sequence[ScoredRecord], margin: float, max_pairs_per_prompt: int = 1
) -> list[PreferenceRecord]:
    """Preference pairs from scored responses, in prompt order.

    Per prompt: chosen is the highest-scored response (ties: the first in file order);
    rejected are the responses with ``chosen.score - score > margin`` whose stripped text
    differs from the chosen one, lowest score first (ties: file order), at most
    ``max_pairs_per_prompt`` of them (0 = all). Pair ids are ``f"{id}#{k}"``, k = 0, 1, ...
    """
    return _select_scored(records, margin, max_pairs_per_prompt).pairs


def filter_pairs(records: Sequence[PreferenceRecord], margin: Optional[float]) -> list[PreferenceRecord]:
    """The pairs with ``chosen_score - rejected_score > margin``, in order.

    ``margin=None`` keeps every pair (scores may be absent). With a number every pair
    needs both scores, else ValueError naming the first pair ids that lack them.
    """
    return _select_preferences(records, margin).pairs


def load_pairs(
    path: Union[str, Path],
    data_format: Format,
    margin: Optional[float],
    max_pairs_per_prompt: int = 1,
    on_bad_sample: Literal["error", "skip"] = "error",
    checked_images: Optional[Mapping[Path, Optional[str]]] = None,
) -> PairSet:
    """Reads ``path`` (schema kind ``data_format``) and selects its pairs.

    ``checked_images``: images already checked elsewhere (``schema.read_records``'s ``checked``).

    Scored data needs a margin (0 pairs any strictly lower score). Raises ValueError
    (``schema.DataError`` for schema problems) naming the file, and when no pair
    survives, the margin and the scores seen, so the threshold can be chosen.
    """
    if data_format not in FORMATS:
        raise ValueError(f"data_format: {data_format!r} is not one of {', '.join(repr(f) for f in FORMATS)}")
    if data_format == "scored" and margin is None:
        raise ValueError(f"{path}: scored data needs a margin (the R1V2 report compares 7, 10 and 15; "
                         f"0 pairs every response with any lower-scored one)")
    loaded = load_records(path, data_format, on_bad_sample, checked=checked_images)
    try:
        if data_format == "scored":
            selection = _select_scored(loaded.records, margin, max_pairs_per_prompt)
        else:
            selection = _select_preferences(loaded.records, margin)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if not selection.pairs:
        if selection.score_range is None:
            seen = "no scores"
        else:
            low, high = selection.score_range
            largest = "none" if selection.largest_margin is None else f"{selection.largest_margin:g}"
            seen = f"scores {low:g} to {high:g}, largest chosen-rejected margin {largest}"
        # margin is a number here: without one every (valid, so existing) pair is kept.
        raise ValueError(f"{path}: no pair has a reward margin above {margin:g} out of "
                         f"{selection.candidates} candidate pair(s) ({seen}); lower the margin")
    return PairSet(
        records=selection.pairs,
        prompts=len(loaded.records),
        total_candidates=selection.candidates,
        kept=len(selection.pairs),
        dropped_margin=selection.below_margin,
        dropped_cap=selection.over_cap,
        skipped_bad=loaded.skipped,
        margin=margin,
    )


def _preference_line(record: PreferenceRecord, folder: Path) -> str:
    # The schema resolves image paths against the JSONL's folder (lexically, like abspath),
    # so relpath from the output folder points at the same files.
    obj: dict = {"id": record.id, "images": [os.path.relpath(image, folder) for image in record.images],
                 "prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected}
    if record.chosen_score is not None:
        obj["chosen_score"] = record.chosen_score
    if record.rejected_score is not None:
        obj["rejected_score"] = record.rejected_score
    return json.dumps(obj, ensure_ascii=False)


def write_pairs(records: Sequence[PreferenceRecord], out: Union[str, Path], *, force: bool = False) -> Path:
    """Writes ``records`` as preferences JSONL at ``out``, complete or not at all.

    The lines go to a hidden temporary file beside ``out`` that replaces it only once
    written and flushed; an existing ``out`` is replaced only with ``force``.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; name the output JSONL file")
    folder = Path(os.path.abspath(out)).parent
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out, "".join(_preference_line(r, folder) + "\n" for r in records))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Selects MPO preference pairs by reward margin "
                                     "(R1V2 report, section 3.2) and writes them as preferences JSONL.")
    parser.add_argument("input", type=Path, metavar="IN.jsonl")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="data_format",
                        help="schema of IN: scored responses per prompt, or ready-made preference pairs")
    parser.add_argument("--margin", type=float, default=None,
                        help="keep pairs with chosen_score - rejected_score > MARGIN (the report compares 7, 10, "
                             "15); required for scored input, without it preferences are all kept")
    parser.add_argument("--max-pairs-per-prompt", type=int, default=1,
                        help="scored input: most pairs per prompt, lowest rejected score first (0 = all; default 1)")
    parser.add_argument("--on-bad-sample", choices=("error", "skip"), default="error",
                        help="records with schema problems: fail (default) or skip them")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT.jsonl", help="preferences JSONL to write")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Checked before the (possibly long) selection, and again when writing.
        if args.out.exists() and not args.force:
            raise FileExistsError(f"{args.out} exists; pass --force to replace it")
        pair_set = load_pairs(args.input, args.data_format, args.margin, args.max_pairs_per_prompt,
                              args.on_bad_sample)
        write_pairs(pair_set.records, args.out, force=args.force)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{pair_set.summary()}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
