"""Rewards of the GRPO stage: r_format, r_rule and the hybrid sum of Eq. 7, against hand-computed values."""

import math
import threading

import pytest

from megatron_r1v.config import RewardConfig
from megatron_r1v.data.schema import PromptRecord
from megatron_r1v.rewards import (
    HybridReward,
    RewardItem,
    RewardModelClient,
    calibrate,
    check_format,
    choice_letter,
    extract_answer,
    format_reward,
    math_match,
    normalize_text,
    rule_reward,
    scan_boxed,
)

GOOD = "Let me add.\n3 + 4 = 7\n</think>\n\nThe answer is \\boxed{7}."


# --- r_format ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion,opened,score,answer,reason",
    [
        (GOOD, True, 1.0, "7", "ok"),
        ("<think>\nr\n</think>\n\\boxed{7}", False, 1.0, "7", "ok"),
        ("\n <think>r</think>\\boxed{7}", False, 1.0, "7", "ok"),  # whitespace before <think> is fine
        ("r</think>\\boxed{\\frac{1}{2}}", True, 1.0, "\\frac{1}{2}", "ok"),  # nested braces
        ("r</think>\\boxed{\\{1, 2\\}}", True, 1.0, "\\{1, 2\\}", "ok"),  # escaped braces are not structure
        ("r</think>\\boxed{3}, no wait: \\boxed{ 4 }.", True, 1.0, "4", "ok"),  # the last box, stripped
        ("r</think>\\boxed {7}", True, 1.0, "7", "ok"),  # LaTeX allows the space
        ("r</think>\\boxed{3}}", True, 1.0, "3", "ok"),  # a stray } after a closed box is just text
        # The prompt opened <think>: one in the completion is a duplicate.
        ("<think>\nr\n</think>\n\\boxed{7}", True, 0.0, None, "<think> in the completion although the prompt opened it"),
        ("r\n</think>\n\\boxed{7}", False, 0.0, None, "missing <think>"),
        ("<think>a<think>b</think>\\boxed{7}", False, 0.0, None, "<think> appears 2 times"),
        ("<think>r</think>\\boxed{7}<think>", False, 0.0, None, "<think> appears 2 times"),
        ("hi <think>r</think>\\boxed{7}", False, 0.0, None, "text before <think>"),
        ("</think>r<think>\\boxed{7}", False, 0.0, None, "text before <think>"),
        ("reasoning that never ends \\boxed{7}", True, 0.0, None, "unclosed thought: missing </think>"),
        ("a</think>b</think>\\boxed{7}", True, 0.0, None, "</think> appears 2 times"),
        ("  \n</think>\\boxed{7}", True, 0.0, None, "empty thought"),
        ("r</think>The answer is 7.", True, 0.0, None, "no \\boxed{} answer after </think>"),
        ("r \\boxed{7}</think>so 7", True, 0.0, None, "no \\boxed{} answer after </think>"),
        ("r</think>\\boxed{\\frac{1}{2}", True, 0.0, None, "unbalanced braces in \\boxed{}"),
        ("r</think>\\boxed{3} then \\boxed{4", True, 0.0, None, "unbalanced braces in \\boxed{}"),
        ("r</think>\\boxed{}", True, 0.0, None, "empty \\boxed{}"),
        ("r</think>\\boxed{  }", True, 0.0, None, "empty \\boxed{}"),
        ("r</think>\\boxed 7", True, 0.0, None, "no \\boxed{} answer after </think>"),
        ("", True, 0.0, None, "unclosed thought: missing </think>"),
    ],
)
def test_format_cases(completion, opened, score, answer, reason):
    result = check_format(completion, think_opened_by_prompt=opened)
    assert (result.score, result.answer, result.reason) == (score, answer, reason)
    assert format_reward(completion, think_opened_by_prompt=opened) == score


def test_scan_boxed_and_extract_answer():
    assert scan_boxed("\\boxed{a{b}c} x \\boxed{\\\\}").contents == ("a{b}c", "\\\\")
    assert scan_boxed("\\boxed{a} \\boxed{b").balanced is False
    # The answer is read after the LAST </think> and needs no well-formed tags around it.
    assert extract_answer("<think>x</think> \\boxed{1} </think> \\boxed{2} \\boxed{3}") == "3"
    assert extract_answer("x \\boxed{1}") is None  # never left the thought
    assert extract_answer("x</think> \\boxed{1} and \\boxed{2") is None  # cut off while writing the answer
    assert extract_answer("x</think> 42") is None


# --- r_rule -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer,gold,expected",
    [
        ("3", "3", 1.0), ("3.0", "3", 1.0), ("\\frac{6}{2}", "3", 1.0), ("2+1", "3", 1.0), ("x=3", "3", 1.0),
        ("3 apples", "3", 1.0), ("3 cm", "3", 1.0), ("90^\\circ", "90", 1.0), ("1{,}000", "1000", 1.0),
        ("1,000", "1000", 1.0), ("\\dfrac{1}{2}", "0.5", 1.0), ("1/2", "0.5", 1.0), ("-3", "-3", 1.0),
        ("3.5", "3", 0.0), ("3 or 4", "3", 0.0), ("3 apples and 4 oranges", "3", 0.0),
        ("\\text{three}", "3", 0.0), ("4", "3", 0.0), ("", "3", 0.0),
    ],
)
def test_rule_number(answer, gold, expected):
    assert rule_reward(answer, gold, "number") == expected


@pytest.mark.parametrize(
    "answer,gold,expected",
    [
        ("(x+1)^2", "x^2+2x+1", 1.0), ("y^2+2y+1", "x^2+2x+1", 0.0),
        ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}", 1.0), ("\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{3}}{2}", 1.0),
        ("\\{2, 1\\}", "\\{1, 2\\}", 1.0), ("(1, 2)", "[1, 2]", 0.0), ("[1,2]", "[1, 2]", 1.0),
        ("b+a", "a+b", 1.0), ("2*x", "2x", 1.0),
    ],
)
def test_rule_expression(answer, gold, expected):
    assert rule_reward(answer, gold, "expression") == expected


CHOICES = ("41", "42", "a man", "Paris")


@pytest.mark.parametrize(
    "answer,gold,expected",
    [
        ("B", "B", 1.0), ("(B)", "B", 1.0), ("B.", "B", 1.0), ("B)", "B", 1.0), ("B:", "B", 1.0),
        ("\\text{B}", "B", 1.0), ("\\textbf{(B)}", "B", 1.0), ("B. 42", "B", 1.0), ("(B) 42", "B", 1.0),
        ("42", "B", 1.0), ("A man", "C", 1.0), ("paris!", "D", 1.0),
        ("A", "B", 0.0), ("b", "B", 0.0), ("E", "B", 0.0), ("(B) 41", "B", 0.0), ("43", "B", 0.0),
    ],
)
def test_rule_choice(answer, gold, expected):
    assert rule_reward(answer, gold, "choice", CHOICES) == expected


def test_choice_letter_edge_cases():
    assert choice_letter("B. 41", CHOICES) is None  # letter and text disagree
    assert choice_letter("Paris", ("Paris", "paris.")) is None  # two options with one normal form
    assert choice_letter("C", ("x", "y")) is None  # past the last option
    assert choice_letter("(C)", None) == "C"  # without choices only the letter forms work


@pytest.mark.parametrize(
    "answer,expected",
    [("eiffel tower", 1.0), ("Eiffel  Tower.", 1.0), ("\\text{the Eiffel tower}", 1.0), ("EIFFEL-TOWER", 1.0),
     ("Eiffel", 0.0), ("The Louvre", 0.0)],
)
def test_rule_text(answer, expected):
    assert rule_reward(answer, "The Eiffel Tower", "text") == expected


def test_normalize_text():
    assert normalize_text("  The Eiffel\tTower. ") == "eiffel tower"
    assert normalize_text("An apple, a pear & THE plum!") == "apple pear plum"
    assert normalize_text("Ｐａｒｉｓ") == "paris"  # NFKC folds full-width letters


def test_rule_no_answer_and_bad_type():
    assert rule_reward(None, "3", "number") == 0.0
    with pytest.raises(ValueError, match="answer_type: 'integer' is not one of number, choice, expression, text"):
        rule_reward("3", "3", "integer")


def test_unparseable_gold_falls_back_to_text():
    assert rule_reward("n/a", "N/A", "expression") == 1.0
    assert rule_reward("none", "N/A", "expression") == 0.0


def test_answer_length_cap():
    long_sum = "+".join(["1"] * 200)  # 399 characters that sum to 200
    assert math_match(long_sum, "200") is True
    assert math_match(long_sum, "200", max_answer_chars=398) is False


def test_rule_off_the_main_thread():
    # math-verify's own defaults use signal.alarm, which raises off the main thread; the
    # rule turns its timeouts off there, so a rollout worker thread can score.
    from math_verify import parse

    results, errors = [], []

    def work():
        try:
            parse("$\\frac{6}{2}$", parsing_timeout=5)
        except ValueError as err:
            errors.append(str(err))
        results.append(rule_reward("\\frac{6}{2}", "3", "number"))
        results.append(rule_reward("(x+1)^2", "x^2+2x+1", "expression"))
        results.append(rule_reward("4", "3", "number"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors and "threaded environment" in errors[0]
    assert results == [1.0, 1.0, 0.0]


# --- hybrid (Eq. 7) ---------------------------------------------------------------------


class FixedScorer:
    """A reward model that returns given scores and records the items it was asked about."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = []

    def score(self, items):
        assert all(isinstance(item, RewardItem) for item in items)
        self.calls.append(list(items))
        return self.scores[: len(items)]


class FailingScorer:
    def score(self, items):
        raise AssertionError("the reward model must not be called when model_weight is 0")


def prompt(answer="7", answer_type="number", choices=None, question="What is 3 + 4?", images=()):
    return PromptRecord("p0", tuple(images), question, answer, answer_type, choices)


def test_calibration_forms():
    assert calibrate(-3.25, "none", 1.0) == -3.25
    assert calibrate(2.5, "clip", 1.0) == 1.0 and calibrate(0.5, "clip", 1.0) == 0.5
    assert calibrate(1.0, "step", 1.0) == 1.0 and calibrate(0.999, "step", 1.0) == 0.0
    assert calibrate(3.0, "sigmoid", 1.0) == pytest.approx(1 / (1 + math.exp(-2.0)), abs=1e-15)
    assert calibrate(2.0, "sigmoid", 2.0) == 0.5
    # No overflow far from the threshold.
    assert calibrate(-1000.0, "sigmoid", 0.0) == 0.0 and calibrate(1000.0, "sigmoid", 0.0) == 1.0
    with pytest.raises(ValueError, match="model_calibration: 'tanh' is not one of none, clip, sigmoid, step"):
        calibrate(0.0, "tanh", 0.0)


def test_eq7_unweighted_sum():
    # All weights 1 and no calibration: r = r_rule + r_theta + r_format, as printed in the report.
    scorer = FixedScorer([0.25, -0.75])
    reward = HybridReward(model_weight=1.0, scorer=scorer)
    wrong = GOOD.replace("\\boxed{7}", "\\boxed{8}")
    out = reward.score_batch([prompt(), prompt()], [GOOD, wrong])
    assert [r.total for r in out] == [1.0 + 0.25 + 1.0, 0.0 - 0.75 + 1.0]
    assert [(r.rule, r.format, r.model, r.model_raw) for r in out] == [(1.0, 1.0, 0.25, 0.25), (0.0, 1.0, -0.75, -0.75)]
    assert [r.parsed_answer for r in out] == ["7", "8"]
    # One call for the whole batch: one item per completion, with the question; a text-only
    # model reads the question, a blank line, the completion.
    assert scorer.calls == [[RewardItem("What is 3 + 4?", GOOD), RewardItem("What is 3 + 4?", wrong)]]
    assert [item.text for item in scorer.calls[0]] == ["What is 3 + 4?\n\n" + GOOD, "What is 3 + 4?\n\n" + wrong]


def test_the_reward_model_gets_the_records_images(tmp_path):
    """r_theta judges the image: each item carries its record's image paths (absolute, as
    the loader resolves them), and the policy's closing marker is cut off the completion."""
    images = [tmp_path / "a.png", tmp_path / "b.jpg"]
    scorer = FixedScorer([0.5, 1.5])
    reward = HybridReward(model_weight=2.0, scorer=scorer, reply_end="<|im_end|>")
    records = [prompt(question="<image>\nWhat is 3 + 4?", images=images), prompt(images=images[1:])]
    out = reward.score_batch(records, [GOOD + "<|im_end|>", GOOD])
    assert scorer.calls == [[RewardItem("<image>\nWhat is 3 + 4?", GOOD, (str(images[0]), str(images[1]))),
                             RewardItem("What is 3 + 4?", GOOD, (str(images[1]),))]]
    assert [r.total for r in out] == [1.0 + 1.0 + 2 * 0.5, 1.0 + 1.0 + 2 * 1.5]


def test_weighted_and_calibrated_by_hand():
    # w_rule=1, w_format=0.5, w_theta=2, sigmoid with t=1:
    #   a) right, well-formed,       s=1  -> 1 + 0.5*1 + 2*sigmoid(0)  = 2.5
    #   b) wrong, well-formed,       s=3  -> 0 + 0.5*1 + 2*sigmoid(2)  = 0.5 + 2*0.8807970779778823
    #   c) right, duplicated <think>, s=-1 -> 1 + 0.5*0 + 2*sigmoid(-2) = 1 + 2*0.11920292202211755
    scorer = FixedScorer([1.0, 3.0, -1.0])
    reward = HybridReward(rule_weight=1.0, format_weight=0.5, model_weight=2.0, model_calibration="sigmoid",
                          model_threshold=1.0, scorer=scorer)
    completions = [GOOD, GOOD.replace("\\boxed{7}", "\\boxed{6}"), "<think>" + GOOD]
    out = reward.score_batch([prompt()] * 3, completions)
    assert [r.total for r in out] == pytest.approx([2.5, 2.2615941559557646, 1.2384058440442351], abs=1e-12)
    assert [r.model for r in out] == pytest.approx([0.5, 0.8807970779778823, 0.11920292202211755], abs=1e-12)
    assert [(r.rule, r.format) for r in out] == [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0)]
    assert out[2].format_reason == "<think> in the completion although the prompt opened it"


def test_model_term_off_skips_the_reward_model():
    reward = HybridReward(rule_weight=1.0, format_weight=0.5, scorer=FailingScorer())
    choice = prompt(answer="B", answer_type="choice", choices=("41", "42"))
    out = reward.score_batch([choice, choice], ["r</think>\\boxed{(B)}", "r</think>\\boxed{41}"])
    assert [(r.total, r.rule, r.format, r.model, r.model_raw) for r in out] == [
        (1.5, 1.0, 1.0, 0.0, None), (0.5, 0.0, 1.0, 0.0, None)]


def test_think_opened_by_prompt_false():
    reward = HybridReward(think_opened_by_prompt=False)
    out = reward.score_batch([prompt(), prompt()], ["<think>\n" + GOOD, GOOD])
    assert [(r.rule, r.format, r.total) for r in out] == [(1.0, 1.0, 2.0), (1.0, 0.0, 1.0)]


def test_score_batch_checks_lengths():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        HybridReward().score_batch([prompt(), prompt()], [GOOD])
    assert HybridReward().score_batch([], []) == []


def test_from_config():
    reward = HybridReward.from_config(RewardConfig(rule_weight=2.0, format_weight=0.25))
    assert reward.score_batch([prompt()], [GOOD])[0].total == 2.25
    sleeps = []
    reward = HybridReward.from_config(
        RewardConfig(model_weight=0.5, reward_model_url="http://127.0.0.1:9/", model_timeout_s=2.0,
                     model_retry_s=45.0, model_backoff_s=0.25, model_batch_size=7, model_calibration="clip",
                     model_threshold=3.0, model_image_transport="base64"),
        think_opened_by_prompt=False, sleep=sleeps.append,
    )
    client = reward.scorer
    assert isinstance(client, RewardModelClient)
    assert (client.url, client.timeout_s, client.retry_s, client.backoff_s, client.batch_size,
            client.image_transport) == ("http://127.0.0.1:9", 2.0, 45.0, 0.25, 7, "base64")
    assert client.sleep == sleeps.append
    assert (reward.model_weight, reward.model_calibration, reward.model_threshold, reward.think_opened_by_prompt) == (
        0.5, "clip", 3.0, False)
    # An in-process scorer replaces the client.
    scorer = FixedScorer([5.0])
    reward = HybridReward.from_config(RewardConfig(model_weight=1.0, model_calibration="clip", model_threshold=3.0),
                                      scorer=scorer)
    assert reward.score_batch([prompt()], [GOOD])[0].total == 1.0 + 3.0 + 1.0


def test_overlong_penalty_is_added_with_its_weight():
    # DAPO Eq. 13 with L_max = 100, L_cache = 20, weight 0.5, on a right, well-formed answer
    # (rule 1 + format 1 = 2): |y| = 80 -> 0, 90 -> -0.5, 100 -> -1, 120 (over) -> -1.
    reward = HybridReward.from_config(RewardConfig(overlong_buffer_tokens=20, overlong_penalty_weight=0.5))
    out = reward.score_batch([prompt()] * 4, [GOOD] * 4, lengths=[80, 90, 100, 120], max_tokens=100)
    assert [r.overlong for r in out] == [0.0, -0.5, -1.0, -1.0]
    assert [r.total for r in out] == [2.0, 2.0 - 0.25, 2.0 - 0.5, 2.0 - 0.5]
    assert [(r.rule, r.format, r.model) for r in out] == [(1.0, 1.0, 0.0)] * 4
    # With the reward model and the other weights: added after Eq. 7.
    reward = HybridReward(format_weight=0.5, model_weight=2.0, scorer=FixedScorer([0.25]), overlong_buffer_tokens=4)
    (r,) = reward.score_batch([prompt()], [GOOD], lengths=[7], max_tokens=8)
    assert (r.overlong, r.total) == (-0.75, 1.0 + 0.5 + 2 * 0.25 - 0.75)
    # On, it needs the lengths and the budget, one length per completion.
    with pytest.raises(ValueError, match="overlong_buffer_tokens=4 needs the responses' token counts"):
        reward.score_batch([prompt()], [GOOD])
    with pytest.raises(ValueError, match="2 lengths for 1 completions"):
        reward.score_batch([prompt()], [GOOD], lengths=[1, 2], max_tokens=8)
    with pytest.raises(ValueError, match=r"buffer must be in \[0, max_tokens=4\)"):
        reward.score_batch([prompt()], [GOOD], lengths=[1], max_tokens=4)


def test_overlong_off_is_bit_identical():
    # Default off: the totals are Eq. 7's, bit for bit, whatever the lengths (even past L_max).
    completions = [GOOD, GOOD.replace("\\boxed{7}", "\\boxed{6}"), "<think>" + GOOD]
    kwargs = dict(rule_weight=1.0, format_weight=0.3, model_weight=-0.7, model_calibration="sigmoid",
                  model_threshold=0.1)
    before = HybridReward(scorer=FixedScorer([0.3, -1.1, 2.7]), **kwargs).score_batch([prompt()] * 3, completions)
    off = HybridReward(scorer=FixedScorer([0.3, -1.1, 2.7]), overlong_penalty_weight=3.0, **kwargs)
    after = off.score_batch([prompt()] * 3, completions, lengths=[10, 5000, 10**6], max_tokens=100)
    assert [r.total.hex() for r in after] == [r.total.hex() for r in before]
    assert after == before and all(r.overlong == 0.0 for r in after)
    assert HybridReward.from_config(RewardConfig()).overlong_buffer_tokens == 0


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"model_weight": 1.0}, r"reward\.model_weight=1 needs reward\.reward_model_url"),
        ({"model_calibration": "tanh"}, r"reward\.model_calibration: 'tanh' is not one of"),
        ({"model_retry_s": -1.0}, r"reward\.model_retry_s must be >= 0, got -1"),
        ({"model_timeout_s": 0.0}, r"reward\.model_timeout_s must be > 0"),
        ({"model_batch_size": 0}, r"reward\.model_batch_size must be >= 1"),
        ({"rule_weight": float("nan")}, r"reward\.rule_weight must be finite"),
        ({"model_image_transport": "ftp"}, r"reward\.model_image_transport: 'ftp' is not one of path, base64"),
        ({"overlong_buffer_tokens": -2}, r"reward\.overlong_buffer_tokens must be >= 0, got -2"),
        ({"overlong_penalty_weight": -1.0}, r"reward\.overlong_penalty_weight must be finite and >= 0"),
    ],
)
def test_config_errors_name_the_key(fields, message):
    with pytest.raises(ValueError, match=message):
        HybridReward.from_config(RewardConfig(**fields))


def test_reward_config_from_yaml_overrides():
    from megatron_r1v.config import load_config

    cfg = load_config(None, ["reward.model_calibration=sigmoid", "reward.model_threshold=1.5",
                             "reward.model_retry_s=5"])
    assert (cfg.reward.model_calibration, cfg.reward.model_threshold, cfg.reward.model_retry_s) == (
        "sigmoid", 1.5, 5.0)
    with pytest.raises(ValueError, match=r"'reward\.model_calibration': 'tanh' is not one of"):
        load_config(None, ["reward.model_calibration=tanh"])
