"""DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement
Learning System at Scale", arXiv 2503.14476, Section 3.4, Eq. 13).

With L_max the response token budget (``rollout.max_new_tokens``) and a buffer L_cache
(``reward.overlong_buffer_tokens``):

    R_length(y) = 0                                   |y| <= L_max - L_cache
                  ((L_max - L_cache) - |y|) / L_cache L_max - L_cache < |y| <= L_max      (13)
                  -1                                  L_max < |y|

"added to the original rule-based correctness reward", so a response is punished more the
deeper it runs into the buffer, instead of a truncated response's reward being all noise.
:class:`.hybrid.HybridReward` adds it with ``reward.overlong_penalty_weight``. |y| is the
response's generated token count (the rollout sample's ``response_ids``, the stop token
included when sampling stopped on it): a sampler that stops at ``max_new_tokens`` never
exceeds L_max, so a truncated response gets -1 at |y| = L_max.
"""

from __future__ import annotations


def overlong_penalty(length: int, max_tokens: int, buffer: int) -> float:
    """R_length of DAPO Eq. 13 for a response of ``length`` tokens (a value in [-1, 0]).

    ``buffer`` 0 turns the punishment off (0.0 for every length). Raises ValueError unless
    ``0 <= buffer < max_tokens`` and ``length >= 0``.
    """
    if not 0 <= buffer < max_tokens:
        raise ValueError(f"overlong_penalty: buffer must be in [0, max_tokens={max_tokens}), got {buffer}")
    if length < 0:
        raise ValueError(f"overlong_penalty: length must be >= 0, got {length}")
    if buffer == 0:
        return 0.0
    expected = max_tokens - buffer
    if length <= expected:
        return 0.0
    if length <= max_tokens:
        return (expected - length) / buffer
    return -1.0
