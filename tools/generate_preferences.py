"""MPO data: n responses per prompt, scored with the run's hybrid reward, paired by reward margin.

    python tools/generate_preferences.py --model HF_DIR --prompts prompts.jsonl --out DIR \\
        [--samples 8] [--reward-config RUN.yaml] [--set reward.KEY=VALUE ...] [--margin-threshold 15] \\
        [--max-pairs-per-prompt 1] [--temperature 1.0] [--top-p 1.0] [--max-new-tokens 256] [--seed 0] \\
        [--batch-size 8] [--max-tiles 12] [--tokenizer DIR] [--device cpu] [--engine hf|sglang] \\
        [--tiler auto|dali|pil] [--tiler-threads 2] [--chat-template auto|qwq|qwen2.5|r1-distill]

The data step of R1V2's iterative MPO: each prompt of a ``prompts`` JSONL (``data/schema.py``)
is prepared exactly as ``python -m megatron_r1v.evaluate`` prepares it and answered
``--samples`` times by the rollout engine ``--engine`` (``hf``: transformers, CPU or GPU;
``sglang``: one SGLang engine on ``--device cuda:N``, skywork-layout checkpoints), as
``tools/rejection_sample.py`` samples (``rollout/sampling_runs.py``). Every response is scored
with the hybrid reward of a run (``rewards.hybrid.HybridReward``, Eq. 7: r_rule, r_format and,
when ``reward.model_weight`` is not 0, the reward model served at ``reward.reward_model_url``),
whose settings are the ``reward:`` section of ``--reward-config`` (a run config, read by
``config.load_config`` as ``--config`` is) with ``--set reward.KEY=VALUE`` overrides on top,
checked before anything is loaded. The format term knows whether the template's generation
prompt opened the thought (``think_opened_by_prompt``), as in GRPO. Pairs are made by
``data.pairs.build_pairs``, exactly as MPO training makes them from ``scored`` data with
``mpo.margin_threshold`` and ``mpo.max_pairs_per_prompt``: the best response of a prompt is
chosen, paired with the lowest-scored ones more than ``--margin-threshold`` below it. The
margin is in the reward's units: the report's 7, 10 and 15 are on its reward model's scale;
r_rule + r_format alone span 0..2 (so scale them, e.g. ``--set reward.rule_weight=10``).

Outputs in ``--out`` (each written to a temporary and renamed: never half-written):

* ``scored.jsonl``: kind ``scored``, one record per prompt: ``{"id", "images" (relative to
  --out), "prompt": the question, "responses": [{"text", "score": the total reward}, ...]}``
  in sample order; a text is the decoded reply without its closing token, after ``<think>\\n``
  when the generation prompt opened the thought (``data.template`` removes it again, so the
  trained reply is exactly the sampled one). Responses that cannot be trained on (a chat or
  image special token as text, an empty reply) are left out, and so is a prompt with none left.
  Train on it with ``mpo.data_format=scored``;
* ``preferences.jsonl``: kind ``preferences``, the selected pairs ``{"id": "<prompt id>#<k>",
  "images", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"}``
  (``mpo.data_format=preferences``; possibly empty when no margin exceeds the threshold);
* ``summary.json``: prompts, samples, responses cut at ``--max-new-tokens``, those left out
  and why, statistics (count, mean, std, min, max) of every reward term over all samples
  (total, rule, format, model, model_raw; model_raw null without a reward model), the pair
  counts (kept, candidates, below the margin, over the per-prompt cap, how many prompts got
  0, 1, ... pairs, the prompts without a pair) and the chosen-rejected margins of every
  candidate pair and of the kept ones, with the settings;
* ``margins.png``: histograms of those margins with the threshold;
* ``samples.jsonl`` (progress: every sample's text, tokens, finished and reward terms) and
  ``run.json`` (the settings that decide the samples and their scores).

Resumable as ``tools/rejection_sample.py`` is: a rerun skips the prompts already in
``samples.jsonl``, regenerates a partly written batch whole and rebuilds every output from
``samples.jsonl``, so the files equal an uninterrupted run's (with ``--engine hf`` on the same
device; SGLang honours per-request seeds only with deterministic inference). A rerun with other
sampling settings or other reward weights / calibration is refused;
``--margin-threshold`` and ``--max-pairs-per-prompt`` only select, so a rerun with other values
re-pairs without generating. The reward model's URL is not part of a run: the server may move,
but must serve the same model. When the reward model is on, its server must answer ``/health``
before the model is loaded (with the retries of ``reward.model_retry_s``); a server that fails
later stops the run with status 1 after the last finished batch, and a rerun resumes it.
Progress goes to stderr, the summary (without the id list and settings) is the last stdout line.
User errors print ``error: ...`` and exit with status 2 before anything is generated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megatron_r1v.atomic_dir import write_text_atomic
from megatron_r1v.rewards.run_reward import add_reward_args, reward_config, reward_scorer
from megatron_r1v.rollout.sampling_runs import (
    ENGINES,
    PROGRESS,
    PromptSamples,
    add_sampling_args,
    check_sampling_arguments,
    check_settings,
    reply_text,
    sample_batches,
    sampling_settings,
    start_run,
    stderr,
    trainable_reply,
    user_error,
)

SCORED, PREFERENCES, SUMMARY, PLOT = "scored.jsonl", "preferences.jsonl", "summary.json", "margins.png"
TERMS = ("total", "rule", "format", "model", "model_raw")
# The reward settings that decide the stored scores (run.json); the URL, timeouts and
# retries only decide how the scores are fetched.
SCORING_KEYS = ("rule_weight", "format_weight", "model_weight", "model_calibration", "model_threshold")
# Why a sampled response is left out of scored.jsonl (the training template would refuse it).
LEFT_OUT = ("special token in text", "empty text")


@dataclass(frozen=True)
class ScoredSample:
    """One sampled response and its reward terms (``rewards.hybrid.RewardBreakdown``)."""

    text: str
    """Decoded, special tokens kept, without the stop token that ended it."""
    tokens: int
    """Generated ids, the stop token included."""
    finished: bool
    """A stop token ended it (False: cut at --max-new-tokens)."""
    special_text: bool
    """Holds one of the chat template's marker or image tokens as text."""
    total: float
    rule: float
    format: float
    model: float
    model_raw: Optional[float]

    def left_out(self, think_opened: bool) -> Optional[str]:
        """None when the response goes to scored.jsonl, else the entry of ``LEFT_OUT`` that applies."""
        if self.special_text:
            return LEFT_OUT[0]
        if not trainable_reply(self.text, think_opened).strip():
            return LEFT_OUT[1]
        return None


@dataclass(frozen=True)
class PromptScores(PromptSamples):
    """The scored responses of one prompt, in sample order (one line of ``samples.jsonl``)."""

    responses: tuple[ScoredSample, ...]
    response_type = ScoredSample


def score_groups(reward: Any, template: Any, records: Sequence[Any],
                 groups: Sequence[Sequence[Any]], max_tokens: Optional[int] = None) -> list[PromptScores]:
    """Scores every ``RolloutSample`` of ``groups`` (``groups[i]`` answers ``records[i]``) in one
    ``score_batch`` call, so the reward model gets the batch's items together. The reward gets
    the decoded text as sampled, closing token included, as in GRPO (``HybridReward.reply_end``
    keeps that token from the reward model). ``max_tokens``: the response budget, for DAPO's
    overlong term (``reward.overlong_buffer_tokens``), as GRPO scores it."""
    flat_records = [record for record, group in zip(records, groups, strict=True) for _ in group]
    samples = [s for group in groups for s in group]
    terms = reward.score_batch(flat_records, [s.text for s in samples],
                               lengths=[len(s.response_ids) for s in samples], max_tokens=max_tokens)
    lines, at = [], 0
    for record, group in zip(records, groups):
        samples = []
        for sample, t in zip(group, terms[at:at + len(group)], strict=True):
            text = reply_text(sample, template)
            special = any(token in text for token in template.reserved_text)
            samples.append(ScoredSample(text, len(sample.response_ids), bool(sample.finished), special,
                                        t.total, t.rule, t.format, t.model, t.model_raw))
        lines.append(PromptScores(record.id, record.answer_type, tuple(samples)))
        at += len(group)
    return lines


def scored_records(records: Sequence[Any], results: dict[str, PromptScores], think_opened: bool) -> list:
    """The ``data.schema.ScoredRecord`` of each prompt with a trainable response, in file order."""
    from megatron_r1v.data.schema import ScoredRecord, ScoredResponse

    scored = []
    for record in records:
        responses = tuple(ScoredResponse(trainable_reply(s.text, think_opened), s.total)
                          for s in results[record.id].responses if s.left_out(think_opened) is None)
        if responses:
            scored.append(ScoredRecord(record.id, record.images, record.question, responses))
    return scored


@dataclass(frozen=True)
class PairSelection:
    """The kept pairs and the margins behind them (``data.pairs.build_pairs``)."""

    pairs: list
    """``PreferenceRecord``s, in prompt order."""
    candidate_margins: list[float]
    """chosen - rejected of every candidate pair (the best response with each other distinct one)."""
    above_margin: int
    """Candidates above the threshold, before the per-prompt cap."""


def select_pairs(scored: Sequence[Any], margin: float, max_pairs_per_prompt: int) -> PairSelection:
    from megatron_r1v.data.pairs import build_pairs

    # The chosen response is a prompt's best, so every candidate margin is >= 0 > -1: margin -1
    # with no cap returns every candidate pair.
    candidates = build_pairs(scored, -1.0, 0)
    above = build_pairs(scored, margin, 0)
    return PairSelection(build_pairs(scored, margin, max_pairs_per_prompt),
                         [p.chosen_score - p.rejected_score for p in candidates], len(above))


def _stats(values: Sequence[float]) -> Optional[dict]:
    if not values:
        return None
    return {"count": len(values), "mean": statistics.fmean(values), "std": statistics.pstdev(values),
            "min": min(values), "max": max(values)}


def summarize(records: Sequence[Any], results: dict[str, PromptScores], scored: Sequence[Any],
              selection: PairSelection, think_opened: bool, settings: dict) -> dict:
    """The numbers of ``summary.json`` (module docstring)."""
    samples = [s for record in records for s in results[record.id].responses]
    left_out = Counter(s.left_out(think_opened) for s in samples)
    per_prompt = Counter(p.id.rsplit("#", 1)[0] for p in selection.pairs)  # pair ids are "<prompt id>#<k>"
    without = [record.id for record in records if not per_prompt[record.id]]
    candidates = len(selection.candidate_margins)
    return {
        "prompts": len(records), "samples": len(samples), "cut_at_max_new_tokens": sum(not s.finished for s in samples),
        "scored_prompts": len(scored), "scored_responses": sum(len(r.responses) for r in scored),
        "left_out": {reason: left_out[reason] for reason in LEFT_OUT},
        "terms": {term: _stats([getattr(s, term) for s in samples if getattr(s, term) is not None])
                  for term in TERMS},
        "pairs": {"kept": len(selection.pairs), "candidates": candidates,
                  "below_margin": candidates - selection.above_margin,
                  "over_cap": selection.above_margin - len(selection.pairs),
                  "prompts_with_pairs": len(records) - len(without),
                  "margin_threshold": settings["margin_threshold"],
                  "max_pairs_per_prompt": settings["max_pairs_per_prompt"],
                  "per_prompt": {str(k): v for k, v in sorted(Counter(per_prompt[r.id] for r in records).items())}},
        "margins": {"candidates": _stats(selection.candidate_margins),
                    "kept": _stats([p.chosen_score - p.rejected_score for p in selection.pairs])},
        "prompt_ids_without_pairs": without, "settings": settings,
    }


def _scored_line(record: Any, folder: Path) -> str:
    # Image paths relative to the output folder, as data.pairs.write_pairs writes them.
    return json.dumps({"id": record.id, "images": [os.path.relpath(p, folder) for p in record.images],
                       "prompt": record.prompt,
                       "responses": [{"text": r.text, "score": r.score} for r in record.responses]},
                      ensure_ascii=False) + "\n"


def write_outputs(records: Sequence[Any], results: dict[str, PromptScores], args: argparse.Namespace,
                  settings: dict, think_opened: bool, progress: Callable[[str], None]) -> dict:
    """``scored.jsonl``, ``preferences.jsonl``, ``margins.png`` and ``summary.json`` from the results."""
    from megatron_r1v.data.pairs import write_pairs
    from megatron_r1v.plotting import plot_histograms

    out = Path(args.out)
    folder = Path(os.path.abspath(out))
    scored = scored_records(records, results, think_opened)
    selection = select_pairs(scored, args.margin_threshold, args.max_pairs_per_prompt)
    write_text_atomic(out / SCORED, "".join(_scored_line(r, folder) for r in scored))
    write_pairs(selection.pairs, out / PREFERENCES, force=True)
    kept_margins = [p.chosen_score - p.rejected_score for p in selection.pairs]
    plot_histograms({"every candidate pair": selection.candidate_margins, "kept": kept_margins}, out / PLOT,
                    xlabel="reward margin (chosen - rejected)", ylabel="pairs",
                    title=f"{len(selection.pairs)} pairs kept of {len(selection.candidate_margins)} candidates",
                    marks={f"threshold {args.margin_threshold:g}": args.margin_threshold})
    selection_settings = {"margin_threshold": args.margin_threshold,
                          "max_pairs_per_prompt": args.max_pairs_per_prompt}
    summary = summarize(records, results, scored, selection, think_opened, {**settings, **selection_settings})
    write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    if not selection.pairs:
        largest = max(selection.candidate_margins, default=None)
        progress(f"warning: no pair has a reward margin above {args.margin_threshold:g} (largest: "
                 f"{'none' if largest is None else f'{largest:g}'}); {out / PREFERENCES} is empty")
    return summary


def check_arguments(args: argparse.Namespace) -> Any:
    """Every argument, before anything slow; returns the ``RewardConfig``."""
    check_sampling_arguments(args, ENGINES, SCORED)
    if not math.isfinite(args.margin_threshold) or args.margin_threshold < 0:
        raise ValueError(f"--margin-threshold must be a finite number >= 0, got {args.margin_threshold}")
    if args.max_pairs_per_prompt < 0:
        raise ValueError(f"--max-pairs-per-prompt must be >= 0 (0: every candidate), got {args.max_pairs_per_prompt}")
    return reward_config(args)


def _reward_so_far(threshold: float) -> Callable[[list[PromptScores]], str]:
    def describe(done: list[PromptScores]) -> str:
        totals = [s.total for p in done for s in p.responses]
        spread = sum(max(s.total for s in p.responses) - min(s.total for s in p.responses) > threshold
                     for p in done)
        return f"mean reward {statistics.fmean(totals):.3f} | best - worst > {threshold:g}: {spread}/{len(done)}"

    return describe


def generate_preferences(args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
    """Samples, scores, pairs and writes everything (module docstring); returns the summary."""
    from megatron_r1v.rewards.hybrid import HybridReward

    config = check_arguments(args)
    settings = {**sampling_settings(args), "reward": {key: getattr(config, key) for key in SCORING_KEYS}}
    check_settings(Path(args.out), settings)
    scorer = reward_scorer(config, progress)
    run, results = start_run(args, settings, PromptScores, progress)
    template = run.loader.template
    # As in GRPO: the format term knows whether the prompt opened the thought, and the reward
    # model judges the reply without the policy's closing marker.
    reward = HybridReward.from_config(config, think_opened_by_prompt=run.think_opened, scorer=scorer,
                                      reply_end=template.format.reply_end)
    sample_batches(run, args, Path(args.out), results,
                   lambda records, groups: score_groups(reward, template, records, groups, args.max_new_tokens),
                   _reward_so_far(args.margin_threshold), progress)
    summary_settings = {**settings, "reward_model_url": config.reward_model_url if config.model_weight else None}
    return write_outputs(run.records, results, args, summary_settings, run.think_opened, progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/generate_preferences.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(parser, ENGINES)
    add_reward_args(parser)
    parser.add_argument("--margin-threshold", type=float, default=15.0,
                        help="pair when chosen - rejected reward > this (mpo.margin_threshold; default 15)")
    parser.add_argument("--max-pairs-per-prompt", type=int, default=1,
                        help="most pairs per prompt, lowest rejected score first (0: all; default 1)")
    return parser


def main(argv: Optional[Sequence[str]] = None, progress: Callable[[str], None] = stderr) -> int:
    from megatron_r1v.rewards.reward_model import RewardServerError

    args = build_parser().parse_args(argv)
    try:
        summary = generate_preferences(args, progress)
    except (OSError, ValueError, KeyError) as err:
        return user_error(err)
    except RewardServerError as err:  # down after the start: the finished batches are kept
        print(f"error: {err}; the prompts scored so far are in {Path(args.out) / PROGRESS}: rerun the same "
              "command to resume", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k not in ("prompt_ids_without_pairs", "settings")}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
