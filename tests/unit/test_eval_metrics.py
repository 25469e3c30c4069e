"""evaluate/metrics.py: pass@1 / pass@k, percentiles and the yes/no numbers from known records."""

from types import SimpleNamespace

import pytest

from megatron_r1v.evaluate.items import EvalItem
from megatron_r1v.evaluate.metrics import hallucination_numbers, length_stats, nearest_rank, pass_rates, summarize


def _line(item_id, correct, tokens=None, finished=None, extracted=None):
    """A line of samples.jsonl as the runner reads it back: one response per entry of ``correct``."""
    n = len(correct)
    return SimpleNamespace(id=item_id, responses=tuple(SimpleNamespace(
        correct=c, rule=c, judge=None, judge_error=None, format=True, tokens=(tokens or [10] * n)[j],
        finished=(finished or [True] * n)[j], extracted=(extracted or [None] * n)[j]) for j, c in enumerate(correct)))


def _item(item_id, kind="number", answers=("1",), category="all"):
    return EvalItem(item_id, "q", (), answers, kind, category, f"f:{item_id}")


def test_pass_at_1_is_the_mean_over_runs_and_pass_at_k_any_correct():
    lines = [_line("a", [True, False, False]), _line("b", [False, False, False]), _line("c", [True, True, False])]
    rates = pass_rates(lines)
    assert rates == {"num_items": 3, "pass@1": pytest.approx(3 / 9), "pass@k": 2 / 3}
    result = summarize([_item("a"), _item("b", category="x"), _item("c")], lines, 3)
    assert result["pass@1_by_run"] == [2 / 3, 1 / 3, 0.0]
    assert sum(result["pass@1_by_run"]) / 3 == pytest.approx(result["pass@1"])
    assert result["by_type"]["x"] == {"num_items": 1, "pass@1": 0.0, "pass@k": 0.0}
    assert result["by_type"]["all"]["pass@k"] == 1.0
    with pytest.raises(AssertionError):  # every line must hold k responses
        summarize([_item("a")], [_line("a", [True])], 3)


def test_nearest_rank_percentile_and_lengths():
    assert nearest_rank([5], 0.9) == 5
    assert nearest_rank(list(range(1, 11)), 0.9) == 9  # ceil(0.9 * 10) = 9th smallest
    assert nearest_rank(list(range(1, 12)), 0.9) == 10  # ceil(9.9) = 10th
    assert length_stats([]) == {"num_samples": 0, "mean_tokens": None, "p90_tokens": None}
    lines = [_line("a", [True, False], tokens=[4, 100], finished=[True, False])]
    result = summarize([_item("a")], lines, 2)
    assert result["lengths"]["correct"] == {"num_samples": 1, "mean_tokens": 4.0, "p90_tokens": 4.0}
    assert result["lengths"]["incorrect"]["mean_tokens"] == 100.0 and result["truncation_rate"] == 0.5


def test_hallucination_numbers_from_known_answers():
    golds = ["yes", "yes", "yes", "no", "no", "no", "no", "no"]
    preds = ["yes", "yes", None, "yes", "no", "no", "yes", None]
    numbers = hallucination_numbers(golds, preds)
    # TP 2, FP 2 (absent objects claimed), FN 1 (one unanswered "yes"), negatives 5.
    assert numbers["precision"] == 0.5 and numbers["recall"] == pytest.approx(2 / 3)
    assert numbers["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert numbers["accuracy"] == 4 / 8 and numbers["yes_ratio"] == 4 / 8 and numbers["unanswered_rate"] == 2 / 8
    assert numbers["hallucination_rate"] == 2 / 5
    items = [_item(str(i), "yes_no", (g,)) for i, g in enumerate(golds)]
    lines = [_line(str(i), [g == p], extracted=[p]) for i, (g, p) in enumerate(zip(golds, preds))]
    assert summarize(items, lines, 1)["hallucination"] == numbers
    assert "hallucination" not in summarize([_item("a")], [_line("a", [True])], 1)
