"""Tiny random Skywork-VL-Reward checkpoints for tests and demos (``tools/make_tiny_checkpoint.py``).

The folder has the release's files, only tiny: a Qwen2.5-VL ``config.json`` and
``model.safetensors`` (``save_pretrained`` of ``Qwen2_5_VLForConditionalGeneration``), the
image processor's ``preprocessor_config.json`` (``Qwen2VLImageProcessor``, 14-px patches
merged 2 x 2, images resized to at most 112 x 112 pixels so a test image costs a handful of
tokens), a byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``), and
``value_head.safetensors`` (:mod:`.value_head`). Everything loads offline, on CPU, in
about a second. The weights are random (from ``seed``), so scores mean nothing, but they
depend on the image, the prompt and the response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

# Qwen2.5-VL's special tokens, in the order of their ids there (151643...).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL / Qwen2.5-VL-Instruct's chat template (their chat_template.json), verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = (
    "system user assistant You are a helpful assistant. Think step by step, then give the final answer in "
    "\\boxed{}. What is in the image? How many objects are there? The answer is 7. The image shows a red square "
    "and a blue circle. Which option is correct? (A) (B) (C) (D) Let me count the shapes. </think>"
)
TINY_MAX_PIXELS = 112 * 112


def train_qwen_vl_tokenizer(extra_texts: tuple[str, ...] = ()) -> "object":
    """A byte-level BPE (any text encodes) with Qwen2.5-VL's special tokens after its merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + 128, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator([CORPUS, *extra_texts] * 4, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def tiny_qwen2_5_vl_config(tokenizer: "object") -> "object":
    """A two-layer Qwen2.5-VL (hidden 32; vision: two blocks of width 16) for ``tokenizer``."""
    import transformers

    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                # head_dim 16: M-RoPE's (temporal, height, width) sections must sum to 16 / 2.
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                initializer_range=0.1)
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                  initializer_range=0.1)
    return transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def write_tiny_skywork_vl(out: Union[str, Path], seed: int = 0) -> dict:
    """Writes the folder of the module docstring into ``out`` (which must exist); returns a summary."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .value_head import describe_value_head, random_value_head, save_value_head

    out = Path(out)
    tokenizer = train_qwen_vl_tokenizer()
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                           pad_token="<|endoftext|>", model_max_length=4096,
                                           clean_up_tokenization_spaces=False)
    hf_tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    hf_tokenizer.save_pretrained(str(out))
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=TINY_MAX_PIXELS).save_pretrained(str(out))
    config = tiny_qwen2_5_vl_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(str(out))
    hidden = config.text_config.hidden_size
    save_value_head(out, *random_value_head(hidden, seed))
    return {"vocab_size": tokenizer.get_vocab_size(), "hidden_size": hidden, "image_token_id": config.image_token_id,
            "num_parameters": sum(p.numel() for p in model.parameters()), "value_head": describe_value_head(hidden)}
