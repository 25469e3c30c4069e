"""Rewards of the GRPO stage: the hybrid reward of the R1V2 report (Eq. 7).

    r(x, y_i) = w_rule * r_rule + w_theta * c_t(r_theta) + w_format * r_format

- :mod:`.rule`: r_rule, answer correctness (math-verify, choice letters, normalized text);
- :mod:`.format`: r_format, ``<think>...</think>`` then a final ``\\boxed{}`` answer;
- :mod:`.protocol`: what r_theta judges (:class:`RewardItem`: prompt, response, images)
  and the JSON contract of ``tools/serve_reward_model.py``;
- :mod:`.reward_model`: the HTTP client and the text-only sequence-classification scorer;
- :mod:`.skywork_vl`, :mod:`.r1v_reward`, :mod:`.value_head`, :mod:`.loading`: the
  image-aware reward models (Skywork-VL-Reward's Qwen2.5-VL, or an R1V checkpoint, each with
  a scalar value head) and how a folder's kind is found;
- :mod:`.hybrid`: the weighted sum with the calibration c_t, over batches.
"""

from .format import FormatResult, check_format, extract_answer, format_reward, scan_boxed
from .hybrid import CALIBRATIONS, HybridReward, RewardBreakdown, calibrate, check_reward_config, default_reward_item
from .protocol import RewardItem, RewardScorer
from .reward_model import HFRewardModel, RewardModelClient, RewardServerError
from .rule import choice_letter, math_match, normalize_text, rule_reward, text_match

__all__ = [
    "CALIBRATIONS", "FormatResult", "HFRewardModel", "HybridReward", "RewardBreakdown", "RewardItem",
    "RewardModelClient", "RewardScorer", "RewardServerError", "calibrate", "check_format", "check_reward_config",
    "choice_letter", "default_reward_item", "extract_answer", "format_reward", "math_match", "normalize_text",
    "rule_reward", "scan_boxed", "text_match",
]
