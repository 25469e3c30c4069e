"""Which reward model a folder holds, and the scorer that serves it.

Three kinds, told apart by ``config.json``'s ``model_type`` (``--kind auto``):

    skywork-vl   qwen2_5_vl                    + value_head.safetensors   (skywork_vl.py)
    r1v          internvl_chat or internvl     + value_head.safetensors   (r1v_reward.py)
    text         anything else: an AutoModelForSequenceClassification     (reward_model.HFRewardModel)

A vision-language folder without its ``value_head.safetensors`` is an error, not a text
model: scoring it as a classifier would read a randomly initialized score layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .value_head import VALUE_HEAD_FILE

REWARD_KINDS = ("skywork-vl", "r1v", "text")
_VL_MODEL_TYPES = {"qwen2_5_vl": "skywork-vl", "internvl_chat": "r1v", "internvl": "r1v"}


@dataclass(frozen=True)
class ScorerOptions:
    """What the server's flags set; each kind uses the fields that apply to it."""

    device: str = "cpu"
    batch_size: int = 8
    dtype: str = "fp32"
    max_length: Optional[int] = None
    score_index: int = 0
    """text only: which logit is the score."""
    max_tiles: int = 12
    """r1v only: InternVL dynamic-tiling grid tiles per image (thumbnail not counted)."""


def detect_reward_kind(model_dir: Union[str, Path]) -> str:
    """The kind of the model in ``model_dir`` (module docstring); FileNotFoundError or
    ValueError naming the file when the folder is not a model or misses its value head."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist (expected a Hugging Face model folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    kind = _VL_MODEL_TYPES.get(model_type, "text")
    if kind != "text" and not (Path(model_dir) / VALUE_HEAD_FILE).is_file():
        raise FileNotFoundError(f"{Path(model_dir) / VALUE_HEAD_FILE} does not exist: a {model_type} reward model "
                                f"({kind}) keeps its scalar value head there")
    return kind


def load_reward_model(model_dir: Union[str, Path], options: ScorerOptions = ScorerOptions(),
                      kind: str = "auto") -> Any:
    """The scorer for ``model_dir``: ``.score(items)``, ``.kind``, ``.sees_images``,
    ``.num_labels``, ``.score_index`` (and ``.score_texts`` for the text kind)."""
    found = detect_reward_kind(model_dir)
    if kind not in ("auto", found):
        raise ValueError(f"--kind {kind}: {model_dir} holds a {found} reward model")
    o = options
    if found == "skywork-vl":
        from .skywork_vl import SkyworkVLRewardModel

        return SkyworkVLRewardModel(model_dir, o.device, o.batch_size, o.dtype, o.max_length)
    if found == "r1v":
        from .r1v_reward import R1VRewardModel

        return R1VRewardModel(model_dir, o.device, o.batch_size, o.dtype, o.max_tiles, o.max_length)
    from .reward_model import HFRewardModel

    return HFRewardModel(model_dir, device=o.device, batch_size=o.batch_size, score_index=o.score_index,
                         max_length=o.max_length, dtype=o.dtype)
