"""The hybrid reward of GRPO (Skywork R1V2 report, Section 3.3.1, Eq. 7).

The report (arXiv 2504.16656): "we again utilize our Skywork-VL reward model to
introduce a preference reward signal r_theta, supplementing the rule-based reward
r_rule. Furthermore, we incorporate a format reward r_format to align the model's output
with the DeepSeek R1-style chat template. Thus, our hybrid reward function is defined as

    r(x, y_i) = r_rule(x, y_i) + r_theta(x, y_i) + r_format(x, y_i)        (7)"

The abstract adds that "excessive reinforcement signals can induce visual
hallucinations—a phenomenon we systematically monitor and mitigate through calibrated
reward thresholds", and the conclusion asks for "careful reward calibration"; the report
gives no formula for either. This module implements Eq. 7 with a weight per term and a
configurable calibration c_t of the reward-model score s:

    r(x, y_i) = w_rule * r_rule(x, y_i) + w_theta * c_t(s(x, y_i)) + w_format * r_format(x, y_i)

    c_t(s) = s                      "none"     (Eq. 7 as printed)
             min(s, t)              "clip"     caps the model's reward, so no response can
                                               collect an excessive signal from it
             1 / (1 + exp(t - s))   "sigmoid"  maps the unbounded logit into (0, 1), the range
                                               of r_rule and r_format; t is the score worth 0.5
             1 if s >= t else 0     "step"     the model's verdict thresholded at t

With all weights 1 and ``"none"`` this is Eq. 7 exactly. ``RewardConfig``'s default
``model_weight`` is 0 (r_rule + r_format) because a reward model needs a server; the
calibration defaults to ``"none"``. r_rule is :mod:`.rule`, r_format :mod:`.format`, s
comes from any :class:`RewardScorer` (:mod:`.protocol`; in practice the HTTP client of
:mod:`.reward_model` and ``tools/serve_reward_model.py``). The total feeds the group
advantage of Eq. 6.

The reward model judges a :class:`RewardItem` per completion: the record's question (its
``<image>`` placeholders included), the completion, and the record's images (absolute
paths, ``PromptRecord.images``), so an image-aware model sees the image it judges. The
policy's reply-closing marker at the end of a completion (``<|im_end|>`` when sampling
stopped on it; ``reply_end``) is cut off first: the reward model renders its own turn end.

With ``reward.overlong_buffer_tokens`` L_cache > 0, DAPO's soft overlong punishment (Eq. 13,
:mod:`.overlong`) is added to the total: r(x, y_i) + w_overlong * R_length(y_i), with L_max
the token budget the responses were sampled with and |y_i| their generated token counts
(both passed to :meth:`HybridReward.score_batch`). Off (the default), totals are exactly Eq. 7's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megatron_r1v.config import RewardConfig
from megatron_r1v.data.schema import PromptRecord
from megatron_r1v.validation import check_reward_config

from .format import check_format, extract_answer
from .overlong import overlong_penalty
from .protocol import RewardItem, RewardScorer
from .reward_model import RewardModelClient
from .rule import DEFAULT_TIMEOUT_S, rule_reward

CALIBRATIONS = ("none", "clip", "sigmoid", "step")

RewardItemFn = Callable[[PromptRecord, str], RewardItem]


@dataclass(frozen=True)
class RewardBreakdown:
    """The reward of one completion and its terms (unweighted)."""

    total: float
    """r(x, y_i) of Eq. 7 with the weights applied."""
    rule: float
    """r_rule: 1.0 or 0.0."""
    format: float
    """r_format: 1.0 or 0.0."""
    model: float
    """r_theta after calibration; 0.0 when the reward model is off."""
    model_raw: Optional[float]
    """The reward model's raw score s; None when the reward model is off."""
    parsed_answer: Optional[str]
    """The final \\boxed{} content the rule judged; None when none was found."""
    format_reason: str
    """"ok", or why r_format is 0."""
    overlong: float = 0.0
    """DAPO's R_length (Eq. 13, unweighted, in [-1, 0]); 0.0 when the punishment is off."""


def calibrate(score: float, mode: str, threshold: float) -> float:
    """c_t(s) of the module docstring."""
    if mode == "none":
        return score
    if mode == "clip":
        return min(score, threshold)
    if mode == "sigmoid":
        x = score - threshold
        # Two forms so that exp never overflows for large |x|.
        return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    if mode == "step":
        return 1.0 if score >= threshold else 0.0
    raise ValueError(f"model_calibration: {mode!r} is not one of {', '.join(CALIBRATIONS)}")


def default_reward_item(prompt: PromptRecord, completion: str) -> RewardItem:
    """What the reward model judges: the question, the completion and the record's images.
    (A text-only model reads ``item.text``: the question, a blank line, the completion.)"""
    return RewardItem(prompt.question, completion, tuple(str(path) for path in prompt.images))


@dataclass
class HybridReward:
    """Eq. 7 over batches of (prompt, completion) pairs.

    ``think_opened_by_prompt`` must match the chat template
    (``data.template.TemplateConfig.open_think``): True when the generation prompt ends
    with ``<think>\\n`` so completions start inside the thought. ``scorer`` is needed
    only when ``model_weight`` is not 0; it is called once per :meth:`score_batch`, with
    one :class:`RewardItem` per completion (``reward_item``).
    """

    rule_weight: float = 1.0
    format_weight: float = 1.0
    model_weight: float = 0.0
    model_calibration: str = "none"
    model_threshold: float = 0.0
    scorer: Optional[RewardScorer] = None
    think_opened_by_prompt: bool = True
    reward_item: RewardItemFn = default_reward_item
    reply_end: Optional[str] = None
    """The policy's reply-closing marker (``data.template.ChatTemplate.format.reply_end``);
    one trailing occurrence is removed from what the reward model judges. None: nothing."""
    rule_timeout_s: Optional[int] = DEFAULT_TIMEOUT_S
    """math-verify's timeout (main thread only; see rule.py)."""
    overlong_buffer_tokens: int = 0
    """L_cache of DAPO's overlong punishment (``reward.overlong_buffer_tokens``); 0: off."""
    overlong_penalty_weight: float = 1.0
    """Its weight in the total (``reward.overlong_penalty_weight``)."""

    def __post_init__(self) -> None:
        calibrate(0.0, self.model_calibration, self.model_threshold)  # rejects an unknown mode now
        if self.overlong_buffer_tokens < 0:
            raise ValueError(f"overlong_buffer_tokens must be >= 0, got {self.overlong_buffer_tokens}")
        if self.model_weight != 0 and self.scorer is None:
            raise ValueError(f"model_weight={self.model_weight:g} needs a reward-model scorer")

    @classmethod
    def from_config(cls, config: RewardConfig, *, think_opened_by_prompt: bool = True,
                    scorer: Optional[RewardScorer] = None, sleep: Callable[[float], None] = time.sleep,
                    reward_item: RewardItemFn = default_reward_item,
                    reply_end: Optional[str] = None) -> "HybridReward":
        """Builds the reward of a run; a RewardModelClient on ``reward_model_url`` unless ``scorer`` is given."""
        check_reward_config(config, has_scorer=scorer is not None)
        if scorer is None and config.model_weight != 0:
            assert config.reward_model_url is not None  # check_reward_config guarantees it
            scorer = RewardModelClient.from_config(config, sleep=sleep)
        return cls(
            rule_weight=config.rule_weight, format_weight=config.format_weight, model_weight=config.model_weight,
            model_calibration=config.model_calibration, model_threshold=config.model_threshold, scorer=scorer,
            think_opened_by_prompt=think_opened_by_prompt, reward_item=reward_item, reply_end=reply_end,
            overlong_buffer_tokens=config.overlong_buffer_tokens,
            overlong_penalty_weight=config.overlong_penalty_weight,
        )

    def combine(self, rule: float, fmt: float, model: float) -> float:
        """Eq. 7 with weights, from the (calibrated) terms."""
        return self.rule_weight * rule + self.model_weight * model + self.format_weight * fmt

    def _judged(self, completion: str) -> str:
        """The completion without the policy's trailing reply-closing marker."""
        if self.reply_end and completion.endswith(self.reply_end):
            return completion[:-len(self.reply_end)]
        return completion

    def overlong_terms(self, count: int, lengths: Optional[Sequence[int]],
                       max_tokens: Optional[int]) -> Optional[list[float]]:
        """R_length (DAPO Eq. 13) of each response; None when the punishment is off."""
        if self.overlong_buffer_tokens == 0:
            return None
        if lengths is None or max_tokens is None:
            raise ValueError(f"overlong_buffer_tokens={self.overlong_buffer_tokens} needs the responses' "
                             "token counts (lengths) and the token budget (max_tokens) in score_batch")
        if len(lengths) != count:
            raise ValueError(f"score_batch: {len(lengths)} lengths for {count} completions")
        return [overlong_penalty(n, max_tokens, self.overlong_buffer_tokens) for n in lengths]

    def score_batch(self, prompts: Sequence[PromptRecord], completions: Sequence[str],
                    lengths: Optional[Sequence[int]] = None,
                    max_tokens: Optional[int] = None) -> list[RewardBreakdown]:
        """One :class:`RewardBreakdown` per completion; ``prompts[i]`` is the prompt of ``completions[i]``.

        ``lengths[i]``: the generated token count of ``completions[i]`` (the rollout sample's
        ``response_ids``, stop token included); ``max_tokens``: the budget it was sampled with
        (``rollout.max_new_tokens``). Both are needed only with the overlong punishment on.
        Raises RewardServerError when the reward model is on and its server stays down.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"score_batch: {len(prompts)} prompts but {len(completions)} completions")
        overlong = self.overlong_terms(len(completions), lengths, max_tokens)
        model_raw: list[Optional[float]] = [None] * len(completions)
        if self.model_weight != 0 and completions:
            assert self.scorer is not None
            items = [self.reward_item(p, self._judged(c)) for p, c in zip(prompts, completions)]
            scores = self.scorer.score(items)
            if len(scores) != len(items):
                raise RuntimeError(f"reward model returned {len(scores)} scores for {len(items)} items")
            model_raw = list(scores)
        results = []
        for i, (prompt, completion, raw) in enumerate(zip(prompts, completions, model_raw)):
            fmt = check_format(completion, self.think_opened_by_prompt)
            answer = extract_answer(completion)
            rule = rule_reward(answer, prompt.answer, prompt.answer_type, prompt.choices,
                               timeout_s=self.rule_timeout_s)
            model = 0.0 if raw is None else calibrate(raw, self.model_calibration, self.model_threshold)
            total, length_term = self.combine(rule, fmt.score, model), 0.0
            if overlong is not None:  # off: the total stays exactly Eq. 7's
                length_term = overlong[i]
                total += self.overlong_penalty_weight * length_term
            results.append(RewardBreakdown(
                total=total, rule=rule, format=fmt.score, model=model, model_raw=raw, parsed_answer=answer,
                format_reason=fmt.reason, overlong=length_term,
            ))
        return results
