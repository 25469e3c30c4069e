"""The scalar value head of a vision-language reward model, stored apart from the model.

Both vision-language reward models served here (Skywork-VL-Reward's Qwen2.5-VL and an
R1V / InternVL checkpoint) are a causal LM plus a linear head read at the last token:

    s = w . h_L + b        h_L: the decoder's final hidden state (after its last norm) at
                           the last real token, [hidden_size]; w: [1, hidden_size]; b: [1]

The head lives in ``value_head.safetensors`` next to the model's own shards, with two
tensors named as trl's ``AutoModelForCausalLMWithValueHead`` names them (its ``v_head``
is a ``ValueHead`` whose ``summary`` is ``nn.Linear(hidden_size, 1)``):

    v_head.summary.weight   [1, hidden_size]
    v_head.summary.bias     [1]

Skywork-VL-Reward-7B's model card loads exactly this file (``cached_file(...,
filename="value_head.safetensors")`` then ``model.load_state_dict(vhead_params,
strict=False)`` on the trl wrapper, whose keys are ``v_head.summary.*``); see
``skywork_vl.py`` for the sources. trl runs the head in the dtype of its parameters,
which it creates in fp32, so the head is applied in fp32 here too, on the hidden state
cast up from the model's dtype. trl itself is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import torch

if TYPE_CHECKING:
    from .protocol import RewardItem

VALUE_HEAD_FILE = "value_head.safetensors"
WEIGHT_KEY = "v_head.summary.weight"
BIAS_KEY = "v_head.summary.bias"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ValueHead:
    """``s = h . w + b`` in fp32 (module docstring)."""

    weight_H: torch.Tensor
    """fp32 [hidden_size]: the one row of ``v_head.summary.weight``."""
    bias: torch.Tensor
    """fp32 scalar: ``v_head.summary.bias[0]``."""

    def __call__(self, hidden_BH: torch.Tensor) -> torch.Tensor:
        """Scores [B] (fp32) of hidden states [B, hidden_size]."""
        return hidden_BH.float() @ self.weight_H + self.bias

    def at_last_token(self, hidden_BLH: torch.Tensor, mask_BL: torch.Tensor) -> list[float]:
        """The score of each row at its last real token. Rows are right-padded, so the last
        real token is at ``mask.sum() - 1``, the index the Skywork-VL card gathers."""
        last_B = mask_BL.sum(dim=1) - 1
        rows_B = torch.arange(hidden_BLH.shape[0], device=hidden_BLH.device)
        return self(hidden_BLH[rows_B, last_B]).cpu().tolist()


def load_value_head(model_dir: Union[str, Path], hidden_size: int,
                    device: Union[str, torch.device] = "cpu") -> ValueHead:
    """The head in ``model_dir/value_head.safetensors``; ValueError naming the file, the key
    and the shape when it does not fit a decoder of ``hidden_size``."""
    from safetensors import SafetensorError, safe_open

    path = Path(model_dir) / VALUE_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a vision-language reward model keeps its value head "
                                f"there ({WEIGHT_KEY} [1, hidden_size], {BIAS_KEY} [1])")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    expected = {WEIGHT_KEY: (1, hidden_size), BIAS_KEY: (1,)}
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(sorted(tensors)) or 'nothing'})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {list(tensors[key].shape)}, expected {list(shape)} "
                             f"(the model's hidden size is {hidden_size})")
    weight_H = tensors[WEIGHT_KEY][0].to(device=device, dtype=torch.float32)
    bias = tensors[BIAS_KEY][0].to(device=device, dtype=torch.float32)
    if not (torch.isfinite(weight_H).all() and torch.isfinite(bias)):
        raise ValueError(f"{path}: the value head holds NaN or Inf")
    return ValueHead(weight_H, bias)


def save_value_head(model_dir: Union[str, Path], weight_1H: torch.Tensor, bias_1: torch.Tensor) -> Path:
    """Writes ``model_dir/value_head.safetensors`` (fp32) under the names of the module docstring."""
    from safetensors.torch import save_file

    if weight_1H.dim() != 2 or weight_1H.shape[0] != 1 or tuple(bias_1.shape) != (1,):
        raise ValueError(f"a value head is weight [1, hidden] and bias [1], got {list(weight_1H.shape)} "
                         f"and {list(bias_1.shape)}")
    path = Path(model_dir) / VALUE_HEAD_FILE
    save_file({WEIGHT_KEY: weight_1H.float().contiguous(), BIAS_KEY: bias_1.float().contiguous()}, str(path))
    return path


def describe_value_head(hidden_size: int) -> dict:
    """The file and tensor shapes of a value head over ``hidden_size`` (for tools' summaries)."""
    return {"file": VALUE_HEAD_FILE, WEIGHT_KEY: [1, hidden_size], BIAS_KEY: [1]}


def random_value_head(hidden_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random head for tiny test models: weight ~ N(0, 1) (not trl's 0.02-scale init, so the
    scores of random models spread over O(1) and differ between inputs), bias ~ N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, hidden_size, generator=generator), torch.randn(1, generator=generator)


class ValueHeadRewardModel:
    """What the vision-language reward models (``skywork_vl``, ``r1v_reward``) share: their
    settings, the batching of :meth:`score` and the right padding their head reads. A subclass
    calls :meth:`_setup` first in its ``__init__``, then sets ``head`` (:func:`load_value_head`),
    ``pad_id`` and ``max_length``, and scores one batch in ``_score_batch(batch, start)``."""

    sees_images = True
    num_labels = 1
    score_index = 0
    head: ValueHead
    pad_id: int

    def _setup(self, model_dir: Union[str, Path], device: str, batch_size: int, dtype: str) -> torch.dtype:
        """Checks and stores the shared settings; the torch dtype of ``dtype`` (a key of DTYPES)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir, self.batch_size, self.device = str(model_dir), batch_size, torch.device(device)
        return DTYPES[dtype]

    def score(self, items: Sequence["RewardItem"]) -> list[float]:
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                scores += self._score_batch(items[start:start + self.batch_size], start)
        return scores

    def _score_batch(self, batch: Sequence["RewardItem"], start: int) -> list[float]:
        raise NotImplementedError

    def _right_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, L], attention mask [B, L]) on the model's device, right-padded with ``pad_id``:
        every real token keeps the position it has alone, and the last real token is at
        ``mask.sum() - 1``, where :meth:`ValueHead.at_last_token` reads the score."""
        width = max(len(row) for row in rows)
        ids_BL = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids_BL[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask_BL[i, :len(row)] = 1
        return ids_BL.to(self.device), mask_BL.to(self.device)
