"""An R1V (InternVL-family) checkpoint plus a value head as an image-aware reward model.

The project's own model family as r_theta: the folder is an R1V checkpoint in either
layout ``rollout.hf_engine.load_hf_engine`` reads (the released skywork / InternVL-chat
layout that ``tools/make_tiny_checkpoint.py`` and ``convert_checkpoint.py export`` write,
or transformers' ``InternVLForConditionalGeneration`` layout), with its tokenizer, plus
``value_head.safetensors`` (:mod:`.value_head`: ``v_head.summary.weight`` [1,
decoder hidden size], ``v_head.summary.bias`` [1]; the same file format as Skywork-VL-Reward).

An item is encoded exactly as the policy's training samples are (``data.template``,
``data.tiling``): the system prompt, the question with each image expanded to
``<img>`` + ``<IMG_CONTEXT>`` x tokens_per_tile x tiles + ``</img>`` (InternVL dynamic
tiling, ``--max-tiles``), the generation prompt (``<think>\\n`` when the template opens
the thought; a response that repeats it loses it), the response, and the reply's closing
token (``<|im_end|>`` for QwQ / R1V2). The score is the value head on the decoder's final
(normed) hidden state at that closing token. The response is encoded as plain text: a
special token written in it (``<img>``, ``<|im_start|>``, ...) is spelled out, never a
marker, so a sampled response can neither add image tokens nor open turns; the think
tags, added but not special, stay tokens as in training. A question holding special-token
text is refused (ValueError naming the item), as the data validator refuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from megatron_r1v.data.tokenizer import THINK_START

from .protocol import RewardItem, open_image
from .value_head import ValueHeadRewardModel, load_value_head


class R1VRewardModel(ValueHeadRewardModel):
    """Scores :class:`RewardItem` s with an R1V checkpoint and its value head (module docstring)."""

    kind = "r1v"

    def __init__(self, model_dir: Union[str, Path], device: str = "cpu", batch_size: int = 8, dtype: str = "fp32",
                 max_tiles: int = 12, max_length: Optional[int] = None):
        from megatron_r1v.data.template import ChatTemplate, TemplateConfig
        from megatron_r1v.data.tiling import TilingConfig
        from megatron_r1v.rollout.hf_engine import load_hf_engine

        torch_dtype = self._setup(model_dir, device, batch_size, dtype)
        engine, arch, self.tokenizer = load_hf_engine(model_dir, device=device)
        if arch.vision is None:
            raise ValueError(f"{model_dir}: no vision tower; an R1V reward model is an InternVL checkpoint")
        self.model = engine.model.to(torch_dtype).eval()
        self.pad_id = engine.pad_id  # never the image token: the model counts those
        self.max_length = min(n for n in (max_length, arch.decoder.max_position_embeddings) if n)
        self.template = ChatTemplate(self.tokenizer, TemplateConfig(tokens_per_tile=arch.tokens_per_tile,
                                                                    max_seq_len=self.max_length))
        if self.template.image_token_id != arch.image_token_id:
            raise ValueError(f"{model_dir}: the tokenizer's <IMG_CONTEXT> id {self.template.image_token_id} is not "
                             f"the model's image token id {arch.image_token_id}")
        self.tiling = TilingConfig(image_size=arch.vision.image_size, max_tiles=max_tiles)
        self.head = load_value_head(model_dir, arch.decoder.hidden_size, self.device)

    def encode(self, item: RewardItem, where: str) -> tuple[list[int], Optional[torch.Tensor]]:
        """(token ids, tiles [N, 3, S, S] or None) of one item, as the policy's samples are built."""
        from megatron_r1v.data.template import OverlengthError
        from megatron_r1v.data.tiling import tile_image

        tiled = [tile_image(open_image(src, f"{where}.images[{j}]"), self.tiling) for j, src in enumerate(item.images)]
        prompt = self.template.prompt_ids(where, item.prompt, [t.num_tiles for t in tiled]).tolist()
        response = item.response
        opened = THINK_START + "\n"
        if self.template.open_think and response.startswith(opened):
            response = response[len(opened):]  # the generation prompt already opened the thought
        answer = self.tokenizer(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids = prompt + answer + [self.template.stop_token_id]
        if len(ids) > self.max_length:
            raise OverlengthError(f"{where}: {len(prompt)} prompt + {len(answer) + 1} response tokens exceed the "
                                  f"reward model's {self.max_length}")
        return ids, torch.cat([t.pixel_values for t in tiled]) if tiled else None

    def _score_batch(self, batch: Sequence[RewardItem], start: int) -> list[float]:
        encoded = [self.encode(item, f"items[{start + i}]") for i, item in enumerate(batch)]
        ids_BL, mask_BL = self._right_pad([ids for ids, _ in encoded])
        tiles = [pixels for _, pixels in encoded if pixels is not None]  # batch-major, as the model scatters
        pixel_values = torch.cat(tiles).to(self.device, self.model.dtype) if tiles else None
        out = self.model.model(input_ids=ids_BL, pixel_values=pixel_values, attention_mask=mask_BL, use_cache=False)
        return self.head.at_last_token(out.last_hidden_state, mask_BL)
