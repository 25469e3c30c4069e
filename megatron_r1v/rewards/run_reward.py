"""The hybrid reward of a run, for offline tools that score rollouts outside training.

``tools/generate_preferences.py`` and ``python -m megatron_r1v.ssb.prompt_pool`` score with
the reward GRPO would use: the ``reward:`` section of a run config (``--reward-config``, read
by ``config.load_config`` as the trainer reads ``--config``) with ``--set KEY=VALUE``
overrides on top, checked before anything slow is loaded; and, when ``reward.model_weight``
is not 0, a reward-model server that must answer ``/health`` first, so a server that is
down is an error before any model is loaded or any prompt rolled out.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

from megatron_r1v.config import RewardConfig, RunConfig


def run_config(args: argparse.Namespace, allowed: Sequence[str] = ("reward.",),
               what: str = "reward.* keys can be set here (the run's reward)") -> RunConfig:
    """The run config of ``args.reward_config`` with ``args.overrides`` (``--set``), whose
    reward is checked (ValueError naming the flag). Only overrides starting with one of
    ``allowed`` are accepted: the tool uses those sections alone, so another key would be
    silently ignored."""
    from megatron_r1v.config import load_config
    from megatron_r1v.validation import check_reward_config

    for override in args.overrides:
        if not override.startswith(tuple(allowed)):
            raise ValueError(f"--set {override!r}: only {what}")
    try:
        config = load_config(args.reward_config, args.overrides)
        check_reward_config(config.reward)
    except ValueError as err:
        raise ValueError(f"--reward-config / --set: {err}") from None
    return config


def reward_config(args: argparse.Namespace) -> RewardConfig:
    """The ``RewardConfig`` of ``--reward-config`` and ``--set``, checked (ValueError naming the flag)."""
    return run_config(args).reward


def reward_scorer(config: RewardConfig, progress: Callable[[str], None]) -> Any:
    """The reward-model client of ``config`` (None when the reward model is off), whose server
    has answered ``/health``: a server that is down is an error before the model is loaded."""
    from megatron_r1v.rewards.reward_model import RewardModelClient, RewardServerError

    if config.model_weight == 0:
        return None
    client = RewardModelClient.from_config(config)
    try:
        health = client.health()
    except RewardServerError as err:
        raise ValueError(f"{err}; start it (tools/serve_reward_model.py) or set reward.model_weight=0") from None
    progress(f"reward model server at {client.url}: {health.get('model', 'ok')}")
    return client


def add_reward_args(parser: argparse.ArgumentParser, settable: str = "reward.KEY=VALUE") -> None:
    """``--reward-config YAML`` and repeatable ``--set KEY=VALUE`` (``args.overrides``)."""
    parser.add_argument("--reward-config", default=None, metavar="YAML",
                        help="run config whose reward: section is the reward (default: RewardConfig's defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar=settable,
                        help="override a reward setting, e.g. --set reward.model_weight=1 (repeatable)")
