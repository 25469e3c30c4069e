"""Skywork-VL-Reward: a Qwen2.5-VL checkpoint plus a scalar value head, scored at the last token.

Where each name comes from (the public release ``Skywork/Skywork-VL-Reward-7B``, read
through its model card / README on Hugging Face and copies of its inference code):

* "Skywork-VL-Reward is based on the Qwen2.5-VL-7B-Instruct architecture with the
  addition of a value head structure" (card). The folder is a Qwen2.5-VL checkpoint
  (``config.json`` ``model_type: qwen2_5_vl``; the card loads it with
  ``Qwen2_5_VLForConditionalGeneration.from_pretrained``) with its processor and
  tokenizer files (``AutoProcessor.from_pretrained("Skywork/Skywork-VL-Reward-7B")``).
* The value head is NOT in the model shards: the card fetches
  ``cached_file(path_or_repo_id="Skywork/Skywork-VL-Reward-7B", filename="value_head.safetensors")``,
  reads every key with ``safe_open`` and calls ``model.load_state_dict(vhead_params,
  strict=False)`` on ``trl.AutoModelForCausalLMWithValueHead.from_pretrained(model)``.
  With ``strict=False`` only keys that match the wrapper load, and the wrapper names its
  head ``v_head.summary.{weight,bias}`` (trl's ``ValueHead.summary = nn.Linear(hidden_size,
  1)``), which is also LLaMA-Factory's value-head file format (``value_head.safetensors``,
  keys ``v_head.summary.weight`` / ``v_head.summary.bias``). A third-party reimplementation
  that reads the file without trl records the shapes ``[1, 3584]`` and ``[1]`` (3584 is
  Qwen2.5-VL-7B's hidden size). See :mod:`.value_head`.
* The conversation (card): ``[{"role": "user", "content": [{"type": "image", "image":
  ...}, {"type": "text", "text": question}]}, {"role": "assistant", "content": answer}]``,
  rendered with ``processor.apply_chat_template(messages, tokenize=False,
  add_generation_prompt=False)`` (Qwen2.5-VL's template: a default system turn "You are a
  helpful assistant.", each image as ``<|vision_start|><|image_pad|><|vision_end|>``, every
  turn closed by ``<|im_end|>\\n``), images through ``qwen_vl_utils.process_vision_info``
  and ``processor(text=[text], images=..., padding=True)``.
* The score (card): ``values = model(**inputs, return_dict=True, use_cache=False)[-1]``
  (trl's per-token values: the head on the last layer's hidden states) and
  ``values.gather(dim=-1, index=(inputs["attention_mask"].sum(dim=-1, keepdim=True) - 1))``:
  the value at the last real token, i.e. the ``\\n`` after the reply's ``<|im_end|>``.

This module does the same without trl and without the processor class (which cannot be
built without torchvision in transformers 5): the chat template of the checkpoint
(``chat_template.jinja``, ``chat_template.json`` or the tokenizer's) renders the turns;
the image processor the checkpoint names (``AutoImageProcessor``: the same resizing
rules as ``process_vision_info``, min/max pixels from ``preprocessor_config.json``) makes
``pixel_values`` and ``image_grid_thw``; each ``<|image_pad|>`` is expanded to
``prod(grid_thw) / merge_size**2`` tokens as ``Qwen2_5_VLProcessor`` does; the modality
ids the processor would add (``mm_token_type_ids``: 1 on image tokens) make the model use
its 3D M-RoPE positions; the decoder's final (normed) hidden state at the last real token
goes through the value head in fp32. A question's ``<image>`` placeholders place its
images (text around them stripped of surrounding whitespace); without placeholders the
images come first, as in the card. A question holding special-token text is refused
(ValueError naming the item: the data validator refuses it too); a sampled response
holding some (``<|im_start|>``, ``<|image_pad|>``...) is encoded as plain text, so it can
neither open turns nor add image tokens (responses without any tokenize exactly as the
whole rendered text does, i.e. as the card's processor call).

Not reproduced: ``qwen_vl_utils.process_vision_info`` resizes an image with PIL before the
processor sees it; here the image processor resizes it (to the same size: both round to
multiples of 28 within min/max pixels), so pixel values may differ in the last bits of the
resampling. The 7B release itself was never loaded here (no network, no GPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from megatron_r1v.data.schema import IMAGE_PLACEHOLDER

from .protocol import RewardItem, open_image
from .value_head import ValueHeadRewardModel, load_value_head

IMAGE_PAD = "<|image_pad|>"
_SENTINEL = "\ue000response\ue000"  # private-use characters: never in a real prompt


def read_chat_template(model_dir: Union[str, Path], tokenizer: Any) -> str:
    """The processor's chat template: ``chat_template.jinja`` (transformers 5), else
    ``chat_template.json`` (Qwen2.5-VL releases), else the tokenizer's."""
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        try:
            return json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{folder / 'chat_template.json'}: no chat_template string in it ({err!r})") from None
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ValueError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or the tokenizer's)")


def user_content(prompt: str, num_images: int, where: str) -> list[dict]:
    """The user turn's content list: images where the prompt's ``<image>`` placeholders are,
    or all first when it has none (the card's order)."""
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        return [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
    if len(pieces) - 1 != num_images:
        raise ValueError(f"{where}.prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for "
                         f"{num_images} images")
    content: list[dict] = []
    for i, text in enumerate(pieces):
        if i:
            content.append({"type": "image"})
        if text.strip():
            content.append({"type": "text", "text": text.strip()})
    return content


class SkyworkVLRewardModel(ValueHeadRewardModel):
    """Scores :class:`RewardItem` s with a Skywork-VL-Reward checkpoint (module docstring)."""

    kind = "skywork-vl"

    def __init__(self, model_dir: Union[str, Path], device: str = "cpu", batch_size: int = 8, dtype: str = "fp32",
                 max_length: Optional[int] = None, attn_implementation: str = "sdpa"):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        torch_dtype = self._setup(model_dir, device, batch_size, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(self.model_dir, local_files_only=True)
        self.chat_template = read_chat_template(model_dir, self.tokenizer)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            self.model_dir, dtype=torch_dtype, attn_implementation=attn_implementation, local_files_only=True)
        self.model.to(self.device).eval()
        config = self.model.config
        self.image_token_id = int(config.image_token_id)
        if self.tokenizer.convert_tokens_to_ids(IMAGE_PAD) != self.image_token_id:
            raise ValueError(f"{self.model_dir}: the tokenizer's {IMAGE_PAD} is not config.json's image_token_id "
                             f"{self.image_token_id}")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None and pad != self.image_token_id else 0
        self.merge_size = int(self.image_processor.merge_size)
        text = config.get_text_config()
        self.max_length = min(n for n in (max_length, text.max_position_embeddings) if n)
        self.head = load_value_head(model_dir, int(text.hidden_size), self.device)
        self.reserved = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]

    def render(self, item: RewardItem, where: str, response: Optional[str] = None) -> str:
        """The conversation as text, one ``<|image_pad|>`` per image (not yet expanded)."""
        token = next((t for t in self.reserved if t in item.prompt), None)
        if token is not None:
            raise ValueError(f"{where}.prompt contains the special token {token!r} as text")
        messages = [{"role": "user", "content": user_content(item.prompt, len(item.images), where)},
                    {"role": "assistant", "content": item.response if response is None else response}]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=False)

    def token_ids(self, item: RewardItem, where: str) -> list[int]:
        """The conversation's ids, one image token per image (expanded later)."""
        if not any(t in item.response for t in self.reserved):
            return self.tokenizer(self.render(item, where), add_special_tokens=False)["input_ids"]
        # A sampled response may hold special-token text (<|im_start|>, <|image_pad|>, ...): it
        # is encoded as plain text, so it can neither open turns nor add image tokens.
        head, sep, tail = self.render(item, where, response=_SENTINEL).partition(_SENTINEL)
        assert sep and _SENTINEL not in tail, "the chat template must write the response once"
        encode = self.tokenizer
        return (encode(head, add_special_tokens=False)["input_ids"]
                + encode(item.response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                + encode(tail, add_special_tokens=False)["input_ids"])

    def _score_batch(self, batch: Sequence[RewardItem], start: int) -> list[float]:
        rows = [self.token_ids(item, f"items[{start + i}]") for i, item in enumerate(batch)]
        images = [open_image(src, f"items[{start + i}].images[{j}]")
                  for i, item in enumerate(batch) for j, src in enumerate(item.images)]
        vision: dict[str, torch.Tensor] = {}
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            vision = {"pixel_values": processed["pixel_values"].to(self.device, self.model.dtype),
                      "image_grid_thw": processed["image_grid_thw"].to(self.device)}
            counts = iter((processed["image_grid_thw"].prod(dim=-1) // self.merge_size**2).tolist())
            rows = [self._expand(row, counts) for row in rows]
        ids_BL, mask_BL = self._pad(rows, start)
        out = self.model.model(input_ids=ids_BL, attention_mask=mask_BL, use_cache=False,
                               mm_token_type_ids=(ids_BL == self.image_token_id).int(), **vision)
        return self.head.at_last_token(out.last_hidden_state, mask_BL)

    def _expand(self, row: list[int], counts: Any) -> list[int]:
        """Each image token repeated as many times as its image has merged patches
        (``Qwen2_5_VLProcessor.replace_image_token``)."""
        out: list[int] = []
        for token in row:
            out += [token] * (next(counts) if token == self.image_token_id else 1)
        return out

    def _pad(self, rows: list[list[int]], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right padding (:meth:`ValueHeadRewardModel._right_pad`) of rows within max_length."""
        for i, row in enumerate(rows):
            if len(row) > self.max_length:
                images = sum(1 for t in row if t == self.image_token_id)
                raise ValueError(f"items[{start + i}]: {len(row)} tokens ({images} of them image tokens) exceed "
                                 f"the reward model's {self.max_length}")
        return self._right_pad(rows)
