"""Rule scoring of benchmark responses (evaluate/scoring.py): extraction and each answer kind,
with cases a no-op rule (always right or always wrong) or a too-lenient one would fail."""

import threading

import pytest

from megatron_r1v.evaluate.items import EvalItem
from megatron_r1v.evaluate.scoring import (RuleVerdict, extract_final_answer, has_final_answer, is_word_like,
                                           lenient_text_match, number_readings, read_yes_no, score_response,
                                           split_list)


def item(kind: str, *answers: str, **fields) -> EvalItem:
    return EvalItem(id="q1", question="<image>\nQ?", images=(), answers=answers, answer_kind=kind,
                    category="c", source="test.jsonl:1", **fields)


def boxed(answer: str) -> str:
    """A well-formed QwQ response whose final answer is ``answer``."""
    return f"Let me think.\n</think>\n\nThe answer is \\boxed{{{answer}}}.<|im_end|>"


def correct(it: EvalItem, answer: str) -> bool:
    return score_response(it, boxed(answer)).correct


# --- extraction ----------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    (boxed("7"), ("7", "boxed")),
    ("r</think>\\boxed{3}, no wait: \\boxed{4}.", ("4", "boxed")),  # the last box wins
    ("r \\boxed{1}\n</think>\nI am not sure.", (None, "none")),  # a box in the thought is not the answer
    ("r \\boxed{1}\n</think>\nThe answer is 2.", ("2", "answer-phrase")),
    ("still thinking, the answer is 5 \\boxed{5}", (None, "none")),  # thought never closed: cut, no answer
    ("r</think>\nThe answer is $\\frac{1}{2}$.<|im_end|>", ("\\frac{1}{2}", "answer-phrase")),
    ("r</think>\n**Answer:** 12\n", ("12", "answer-phrase")),
    ("r</think>\nThe answer is 3. Then I checked.\nFinal answer: 4.", ("4", "answer-phrase")),  # the last phrase
    ("r</think>\nfinal answer: B<｜end▁of▁sentence｜>", ("B", "answer-phrase")),  # R1-Distill's closing token
    ("r</think>\nThe answer is \\boxed{12", (None, "none")),  # cut while writing the box
    ("r</think>\n\\boxed{}", (None, "none")),
    ("r</think>\nIt is seven.", (None, "none")),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    (boxed("7"), True), ("r</think>\nIt is seven.", True),   # a closed thought with prose: the judge reads it
    ("still thinking, the answer is 5", False),             # cut in its reasoning
    ("r</think>\n  <|im_end|>", False),                     # nothing after the thought
])
def test_has_final_answer(text, expected):
    assert has_final_answer(text) is expected


# --- number --------------------------------------------------------------------------------


@pytest.mark.parametrize("answer,expected", [("1.45", True), ("1.449", True), ("1.4", False), ("1.46", False),
                                             ("\\frac{29}{20}", True)])
def test_number_precision_rounds_both_sides(answer, expected):
    assert correct(item("number", "1.45", precision=2), answer) is expected


@pytest.mark.parametrize("answer,expected", [("3", True), ("3.0", True), ("x = 3", True), ("\\frac{6}{2}", True),
                                             ("4", False), ("3.01", False), ("3 or 4", False),
                                             ("3 million", False), ("3 and a half", False), ("33", False)])
def test_number_integer(answer, expected):
    assert correct(item("number", "3"), answer) is expected


@pytest.mark.parametrize("answer,expected", [("5 cm", True), ("5\\,\\text{cm}", True), ("5\\text{ cm}", True),
                                             ("5", True), ("6 cm", False), ("5 cm or 6 cm", False)])
def test_number_item_unit_is_dropped(answer, expected):
    assert correct(item("number", "5", unit="cm"), answer) is expected


@pytest.mark.parametrize("gold,answer,expected", [("5", "5 cm^2", True), ("5", "5 \\mathrm{m/s}", True),
                                                  ("12", "12 km/h", True), ("5", "12 km/h", False),
                                                  ("5", "5 apples", True), ("5", "5 km/h or less", False),
                                                  ("5", "5 to 6", False), ("5", "5 \\text{or more}", False)])
def test_number_unit_words_without_item_unit(gold, answer, expected):
    assert correct(item("number", gold), answer) is expected


def test_number_degrees():
    assert correct(item("number", "90"), "90^\\circ") and correct(item("number", "90"), "90^{\\circ}")
    assert not correct(item("number", "90"), "180^\\circ")


@pytest.mark.parametrize("gold,answer,expected", [
    ("50", "50\\%", True),   # MathVista's percentages are plain numbers
    ("50", "50%", True),
    ("0.5", "50\\%", True),  # the same quantity as a fraction
    ("50", "0.5", False),    # without a percent sign a number is itself
    ("0.5", "50", False),
    ("50", "5\\%", False),
])
def test_number_percent(gold, answer, expected):
    assert correct(item("number", gold), answer) is expected


@pytest.mark.parametrize("answer,expected", [("1,000", True), ("1{,}000", True), ("1\\,000", True),
                                             ("1000.0", True), ("1 000", True),
                                             ("1,001", False), ("1,00", False), ("1, 000", False)])
def test_number_thousands_separators(answer, expected):
    assert correct(item("number", "1000"), answer) is expected


@pytest.mark.parametrize("answer,expected", [("1.6", True), ("1.4", True), ("1.5", True), ("1.61", False),
                                             ("1.39", False)])
def test_number_tolerance(answer, expected):
    assert correct(item("number", "1.5", tolerance=0.1), answer) is expected


@pytest.mark.parametrize("gold,answer,expected", [
    ("999", "998.9999", False), ("999", "999.0001", False),  # an integer gold is exact (AIME)
    ("999", "999.0", True), ("999.0", "999", True), ("33", "033", True), ("999", "3 \\cdot 333", True),
    ("1000000", "1000001", False), ("0.3", "0.1*3", True),   # a fractional gold keeps the relative slack
])
def test_number_integer_gold_is_exact(gold, answer, expected):
    assert correct(item("number", gold), answer) is expected


def test_number_any_gold():
    it = item("number", "2", "-2")
    assert correct(it, "-2") and correct(it, "2") and not correct(it, "4")


def test_number_readings():
    assert number_readings("50\\%") == [50.0, 0.5]
    assert number_readings("\\sqrt{4}") == [2.0]
    assert number_readings("two") == [] and number_readings("1, 2") == []


# --- choice --------------------------------------------------------------------------------

CHOICES = ("12", "15", "the same length", "None of these")


@pytest.mark.parametrize("answer,expected", [
    ("C", True), ("(C)", True), ("C.", True), ("\\text{C}", True),
    ("the same length", True),       # the option's text
    ("(C) the same length", True),   # letter and its own text
    ("C. 12", False),                # the letter with another option's text: a contradiction
    ("B", False), ("15", False),
    ("E", False),                    # a letter past the options
    ("c", False),                    # lowercase may be a variable
    ("15.0", False), ("12.0", False),
])
def test_choice(answer, expected):
    assert correct(item("choice", "C", choices=CHOICES), answer) is expected


@pytest.mark.parametrize("answer,expected", [
    ("C", True), ("C. 12", True), ("(C) 12", True), ("C: 12", True), ("C) the third", True),
    ("B. 12", False), ("F. 12", False), ("12", False), ("c. 12", False),
])
def test_choice_letters_only_options_take_any_text_after_the_letter(answer, expected):
    """MathVerse's vision-only items: the options are in the image, the texts are the letters."""
    assert correct(item("choice", "C", choices=("A", "B", "C", "D", "E")), answer) is expected


def test_choice_number_equivalent_to_one_option():
    assert correct(item("choice", "B", choices=CHOICES), "15.0")


@pytest.mark.parametrize("region,letter,method", [
    ("So the correct option is (C).", "C", "option-letter"),
    ("Comparing them:\n\n**(C)**", "C", "option-letter"),
    ("C.", "C", "option-letter"),
    ("The answer is option (C).", "option (C)", "answer-phrase"),
    ("The segment ends at point C.", None, "none"),  # a trailing capital is not an option letter
    ("Both A and C look plausible", None, "none"),
])
def test_choice_without_box(region, letter, method):
    verdict = score_response(item("choice", "C", choices=CHOICES), f"r\n</think>\n\n{region}<|im_end|>")
    assert verdict == RuleVerdict(letter, method, letter is not None)


def test_choice_lone_letter_past_options_is_wrong():
    verdict = score_response(item("choice", "C", choices=CHOICES), "r</think>\n(F)")
    assert verdict.method == "option-letter" and not verdict.correct


# --- expression ----------------------------------------------------------------------------


@pytest.mark.parametrize("answer,expected", [("(x+1)^2", True), ("x^2 + 2x + 1", True), ("x^2+1", False),
                                             ("y = x^2+2x+1", True), ("", False)])
def test_expression(answer, expected):
    assert score_response(item("expression", "x^2+2x+1"), boxed(answer)).correct is expected


def test_expression_falls_back_to_text():
    assert correct(item("expression", "Oxygen"), "oxygen.") and not correct(item("expression", "Oxygen"), "nitrogen")
    assert correct(item("expression", "Impressionism"), "impressionism")


@pytest.mark.parametrize("gold,answer", [
    ("\\frac{1}{2}", "-\\frac{1}{2}"), ("x^2-1", "x^2+1"), ("2^{-3}", "2^3"), ("[1, 2)", "(1,2)"),
    ("(-\\infty, 3]", "(-\\infty, 3)"), ("y=2x+1", "y=2x-1"), ("\\sqrt{2}/2", "\\sqrt{2}*2"),
])
def test_expression_no_text_fallback_for_math_golds(gold, answer):
    """Normalized text drops signs, brackets and operators: it must not overrule math-verify."""
    assert not correct(item("expression", gold), answer)
    assert correct(item("expression", gold), gold)


@pytest.mark.parametrize("answer,expected", [("3.43", True), ("3.429", True), ("24/7", True),
                                             ("\\frac{24}{7}", True), ("3.44", False), ("3.4", False)])
def test_expression_plain_number_gold_uses_the_number_rule(answer, expected):
    """MMMU's mixed golds ("['24/7', '3.429']") compared at MMMU's 2 decimals."""
    assert correct(item("expression", "24/7", "3.429", precision=2), answer) is expected
    assert not correct(item("expression", "999"), "998.9999")


@pytest.mark.parametrize("text,expected", [
    ("Impressionism", True), ("the mitochondria", True), ("5 cm", False), ("x^2+1", False),
    ("\\frac{1}{2}", False), ("\\sin x + \\log 2", False), ("\\text{cm}", False), ("sqrt(2)", False),
])
def test_is_word_like(text, expected):
    assert is_word_like(text) is expected


# --- text ----------------------------------------------------------------------------------


@pytest.mark.parametrize("answer,expected", [
    ("The Eiffel Tower.", True),                # normalized exact
    ("the Eiffel Tower in Paris", True),        # gold as a whole phrase of a short answer
    ("Tower", False),                           # the answer a part of the gold: not enough
    ("Eiffel", False),
    ("Eiffel Towers", False),                   # whole words only
    ("not the Eiffel Tower", False),            # negated
    ("the Eiffel Tower or the Louvre", False),  # hedged
    ("it is " + "very " * 10 + "clearly the Eiffel Tower", False),  # too long to be an answer
])
def test_text_leniency(answer, expected):
    assert correct(item("text", "Eiffel Tower"), answer) is expected


def test_text_multiple_golds_and_long_gold():
    mmmu = item("text", "mitochondria", "the mitochondrion")
    assert correct(mmmu, "Mitochondrion") and correct(mmmu, "in the mitochondria") and not correct(mmmu, "nucleus")
    long_gold = "the transfer of energy between trophic levels"  # 6 words: exact match only
    assert lenient_text_match("Transfer of energy between trophic levels.", long_gold)
    assert not lenient_text_match("it is the transfer of energy between trophic levels", long_gold)


def test_text_gold_with_hedge_word_may_appear():
    assert lenient_text_match("a cell with no nucleus", "no nucleus")


# --- list ----------------------------------------------------------------------------------


@pytest.mark.parametrize("answer,expected", [
    ("1, 2", True), ("[2, 1]", True),    # order-insensitive (multisets)
    ("(1, 2)", True), ("\\{1, 2\\}", True),
    ("1, 2, 3", False), ("1", False),    # length mismatch
    ("1, 1", False),                     # multiset: one 1 cannot match both
    ("1, 3", False), ("x=1, x=2", True),
])
def test_list(answer, expected):
    assert correct(item("list", "1, 2"), answer) is expected


def test_list_nested_and_expressions():
    it = item("list", "(1, 2), \\frac{1}{2}")
    assert correct(it, "0.5, (1,2)") and not correct(it, "(1, 2), (1, 2)")
    assert split_list("[1, (2, 3), \\{4, 5\\}]") == ["1", "(2, 3)", "{4, 5}"]
    assert split_list("(1, 2), (3, 4)") == ["(1, 2)", "(3, 4)"]  # two groups: no outer pair to remove


def test_list_elements_use_precision_and_tolerance():
    assert correct(item("list", "[1.3, 2.5]", precision=1), "2.5, 1.27")
    assert not correct(item("list", "[1.3, 2.5]", precision=2), "2.5, 1.27")
    assert correct(item("list", "1, 2", tolerance=0.05), "1.04, 1.97")


# --- yes / no ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,gold,verdict", [
    ("r</think>\nYes, there is a dog.<|im_end|>", "yes", RuleVerdict("yes", "yes-no", True)),
    ("r</think>\nYes, there is a dog.<|im_end|>", "no", RuleVerdict("yes", "yes-no", False)),
    ("r</think>\n**No.** The image shows a cat.", "no", RuleVerdict("no", "yes-no", True)),
    (boxed("\\text{No}"), "no", RuleVerdict("\\text{No}", "boxed", True)),
    (boxed("No"), "Yes", RuleVerdict("No", "boxed", False)),
    ("r</think>\nThe answer is yes.", "yes", RuleVerdict("yes", "answer-phrase", True)),
    ("r</think>\nThere is no dog.", "no", RuleVerdict(None, "none", False)),  # not a yes/no first word
    ("Yes, I think so", "yes", RuleVerdict(None, "none", False)),  # thought never closed
    (boxed("maybe"), "yes", RuleVerdict("maybe", "boxed", False)),
])
def test_yes_no(text, gold, verdict):
    assert score_response(item("yes_no", gold), text) == verdict


def test_read_yes_no():
    assert read_yes_no("Yes, there is a dog.") == "yes" and read_yes_no("\\text{NO}") == "no"
    assert read_yes_no("Not sure") is None and read_yes_no("") is None and read_yes_no("yesterday") is None


# --- threads -------------------------------------------------------------------------------


def test_scoring_off_the_main_thread():
    """math-verify's signal.alarm only works in the main thread: a worker must still score."""
    results = []
    thread = threading.Thread(target=lambda: results.append(
        (correct(item("number", "0.75"), "\\frac{3}{4}"), correct(item("list", "1, 2"), "2, 1"))))
    thread.start()
    thread.join()
    assert results == [(True, True)]
