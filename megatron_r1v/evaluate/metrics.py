"""The numbers of one benchmark run, from its per-item sample records.

With ``k`` sampled responses per item and ``c_i`` of them correct:

* ``pass@1`` = mean over items of ``c_i / k``: the accuracy of one response, averaged over
  the ``k`` independent runs (the R1V reports' "Pass@1 ... averaged across 5 independent
  runs"); ``pass@1_by_run[j]`` is run ``j``'s accuracy (sample ``j`` of every item), whose
  mean is ``pass@1``;
* ``pass@k`` = the fraction of items with at least one correct response (the unbiased
  estimator 1 - C(k - c, k) / C(k, k) of Chen et al. 2021 with n = k).

Lengths count generated tokens (the stop token included); ``p90_tokens`` is the
nearest-rank 90th percentile. ``truncation_rate`` is the fraction of responses cut at the
token budget instead of ending (the "overthinking" the R1V3 report's length adaptation
targets shows up here first). For yes/no items (POPE's format) ``hallucination`` adds the
usual yes/no numbers; its ``hallucination_rate`` is the fraction of answers to questions
whose gold is "no" (the object is absent) that say "yes", i.e. claim what is not there.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Optional, Sequence


def nearest_rank(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in (0, 1]) of a non-empty sequence."""
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)])


def length_stats(tokens: Sequence[int]) -> dict:
    """``{"num_samples", "mean_tokens", "p90_tokens"}`` (the means None without samples)."""
    if not tokens:
        return {"num_samples": 0, "mean_tokens": None, "p90_tokens": None}
    return {"num_samples": len(tokens), "mean_tokens": round(sum(tokens) / len(tokens), 2),
            "p90_tokens": nearest_rank(tokens, 0.9)}


def pass_rates(lines: Sequence[Any]) -> dict:
    """``{"num_items", "pass@1", "pass@k"}`` of item lines (each with ``responses``)."""
    if not lines:
        return {"num_items": 0, "pass@1": 0.0, "pass@k": 0.0}
    per_item = [sum(r.correct for r in line.responses) / len(line.responses) for line in lines]
    any_right = [any(r.correct for r in line.responses) for line in lines]
    return {"num_items": len(lines), "pass@1": sum(per_item) / len(lines), "pass@k": sum(any_right) / len(lines)}


def _by_run(lines: Sequence[Any], k: int) -> list[float]:
    return [sum(line.responses[j].correct for line in lines) / len(lines) for j in range(k)] if lines else []


def _judge_numbers(samples: Sequence[Any]) -> Optional[dict]:
    judged = [s for s in samples if s.judge is not None]
    asked = [s for s in samples if s.judge is not None or s.judge_error is not None]
    if not asked:
        return None
    return {"num_judged": len(judged), "no_verdict": len(asked) - len(judged),
            "rule_correct": sum(s.rule for s in samples) / len(samples),
            "judge_correct": sum(bool(s.judge) for s in judged) / len(judged) if judged else None,
            "agreement_with_rule": sum(s.judge == s.rule for s in judged) / len(judged) if judged else None}


def hallucination_numbers(golds: Sequence[str], predictions: Sequence[Optional[str]]) -> dict:
    """Yes/no numbers of responses read as "yes" / "no" / None (unanswered), "yes" the positive class."""
    tp = sum(g == "yes" and p == "yes" for g, p in zip(golds, predictions, strict=True))
    fp = sum(g == "no" and p == "yes" for g, p in zip(golds, predictions))
    fn = sum(g == "yes" and p != "yes" for g, p in zip(golds, predictions))
    n, negatives = len(golds), sum(g == "no" for g in golds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "num_samples": n,
        "accuracy": sum(g == p for g, p in zip(golds, predictions)) / n if n else 0.0,
        "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(p == "yes" for p in predictions) / n if n else 0.0,
        "unanswered_rate": sum(p is None for p in predictions) / n if n else 0.0,
        "hallucination_rate": fp / negatives if negatives else 0.0,
    }


def _hallucination(items: Sequence[Any], lines: Sequence[Any]) -> Optional[dict]:
    from megatron_r1v.evaluate.scoring import read_yes_no

    golds: list[str] = []
    predictions: list[Optional[str]] = []
    for item, line in zip(items, lines, strict=True):
        if item.answer_kind != "yes_no":
            continue
        for response in line.responses:
            golds.append(item.answers[0])
            predictions.append(read_yes_no(response.extracted) if response.extracted is not None else None)
    return hallucination_numbers(golds, predictions) if golds else None


def summarize(items: Sequence[Any], lines: Sequence[Any], k: int) -> dict:
    """The result numbers of a run: ``lines[i]`` holds the ``k`` responses of ``items[i]``
    (``evaluate.runner.ItemSamples``; responses with correct, format, finished, tokens, rule,
    judge, judge_error, extracted)."""
    by_category: dict[str, list] = defaultdict(list)
    for item, line in zip(items, lines, strict=True):
        assert len(line.responses) == k, (line.id, len(line.responses), k)
        by_category[item.category].append(line)
    samples = [r for line in lines for r in line.responses]
    result = {**pass_rates(lines), "k": k, "pass@1_by_run": _by_run(lines, k),
              "by_type": {c: pass_rates(by_category[c]) for c in sorted(by_category)},
              "format": sum(s.format for s in samples) / len(samples) if samples else 0.0,
              "lengths": {**length_stats([s.tokens for s in samples]),
                          "correct": length_stats([s.tokens for s in samples if s.correct]),
                          "incorrect": length_stats([s.tokens for s in samples if not s.correct])},
              "truncation_rate": sum(not s.finished for s in samples) / len(samples) if samples else 0.0}
    judge = _judge_numbers(samples) if samples else None
    if judge is not None:
        result["judge"] = judge
    hallucination = _hallucination(items, lines)
    if hallucination is not None:
        result["hallucination"] = hallucination
    return result
