"""The chat template follows the model family: turn markers read from the tokenizer's
``chat_template`` (data/chat_format.py), and ``data.template.ChatTemplate`` giving exactly the
ids the tokenizer's own ``apply_chat_template`` gives, for QwQ (R1V2), R1-Distill (R1V) and
Qwen2.5 (InternVL3) tokenizers."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_r1v.data.chat_format import (
    FAMILY_TEMPLATES,
    ChatFormat,
    ChatFormatError,
    derive_chat_format,
    resolve_chat_format,
)
from megatron_r1v.data.schema import Message
from megatron_r1v.data.template import IGNORE_INDEX, ChatTemplate, TemplateConfig
from megatron_r1v.data.tokenizer import build_tokenizer, load_tokenizer

VOCAB = 600
TOKENS_PER_TILE = 3
SYSTEM = "Answer in a box."
QUESTION = "<image>\nHow many red circles are there?"
REPLY_1 = "<think>\nI count 3 circles.\n</think>\n\nThe answer is \\boxed{3}."
REPLY_2 = "<think>\nTwo more.\n</think>\n\nThe answer is \\boxed{5}."

# The markers each family's released template writes, spelled out by hand (the reference
# the derivation is checked against).
EXPECTED = {
    "qwq": dict(system_start="<|im_start|>system\n", system_to_user="<|im_end|>\n<|im_start|>user\n",
                start_without_system="<|im_start|>user\n", user_to_reply="<|im_end|>\n<|im_start|>assistant\n",
                think_prefix="<think>\n", reply_end="<|im_end|>", reply_to_user="\n<|im_start|>user\n"),
    "qwen2.5": dict(system_start="<|im_start|>system\n", system_to_user="<|im_end|>\n<|im_start|>user\n",
                    start_without_system="<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                                         "helpful assistant.<|im_end|>\n<|im_start|>user\n",
                    user_to_reply="<|im_end|>\n<|im_start|>assistant\n", think_prefix="", reply_end="<|im_end|>",
                    reply_to_user="\n<|im_start|>user\n"),
    "r1-distill": dict(system_start="<｜begin▁of▁sentence｜>", system_to_user="<｜User｜>",
                       start_without_system="<｜begin▁of▁sentence｜><｜User｜>", user_to_reply="<｜Assistant｜>",
                       think_prefix="<think>\n", reply_end="<｜end▁of▁sentence｜>", reply_to_user="<｜User｜>"),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"question": QUESTION, "chosen": r}) for r in (REPLY_1, REPLY_2)) + "\n")
    return {family: load_tokenizer(build_tokenizer([corpus], VOCAB, root / family, family=family)["out"])
            for family in FAMILY_TEMPLATES}


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_markers_are_read_from_the_tokenizers_chat_template(tokenizers, family):
    found = resolve_chat_format(tokenizers[family])
    assert {k: getattr(found, k) for k in EXPECTED[family]} == EXPECTED[family]
    assert "chat_template of" in found.source
    assert found.opens_think == (family != "qwen2.5")
    # Naming the family gives the same markers as the tokenizer's own template.
    named = resolve_chat_format(tokenizers[family], family)
    assert {k: getattr(named, k) for k in EXPECTED[family]} == EXPECTED[family]


def _expanded(question: str, template: ChatTemplate, tiles: int) -> str:
    image = "<img>" + "<IMG_CONTEXT>" * (tiles * TOKENS_PER_TILE) + "</img>"
    return question.replace("<image>", image)


@pytest.mark.parametrize("system", [SYSTEM, None])
@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_prompt_ids_equal_apply_chat_template(tokenizers, family, system):
    tokenizer = tokenizers[family]
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=TOKENS_PER_TILE, system_prompt=system))
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": _expanded(QUESTION, template, 2)}]
    reference = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = template.prompt_ids("s", QUESTION, [2]).tolist()
    assert ids == tokenizer(reference, add_special_tokens=False)["input_ids"]
    assert ids.count(template.image_token_id) == 2 * TOKENS_PER_TILE
    assert template.render_prompt(QUESTION, [2]) == reference


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_two_turn_conversation_equals_apply_chat_template(tokenizers, family):
    tokenizer = tokenizers[family]
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=TOKENS_PER_TILE))
    # Replies without </think>: the released templates rewrite earlier replies that hold one
    # (they drop the reasoning), which SFT does not (module docstring of data.template).
    replies = ["<think>\nI count three.", "<think>\nTwo more, five."]
    turns = [Message("system", SYSTEM), Message("user", QUESTION), Message("assistant", replies[0]),
             Message("user", "And now?"), Message("assistant", replies[1])]
    sample = template.encode_conversation("c", turns, [1])
    messages = [{"role": m.role, "content": m.content} for m in turns]
    messages[1]["content"] = _expanded(QUESTION, template, 1)
    reference = tokenizer.apply_chat_template(messages, tokenize=False)
    end = template.format.reply_end
    reference = reference[:reference.rindex(end) + len(end)]  # the separator after the last reply is not trained
    assert sample.input_ids.tolist() == tokenizer(reference, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_labels_are_the_replies_and_their_closing_tokens(tokenizers, family):
    tokenizer = tokenizers[family]
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=TOKENS_PER_TILE))
    turns = [Message("user", QUESTION), Message("assistant", REPLY_1), Message("user", "And now?"),
             Message("assistant", REPLY_2)]
    sample = template.encode_conversation("c", turns, [1])
    end, opened = template.format.reply_end, template.format.think_prefix
    # A reply that starts with the thought the generation prompt opened is trained without it.
    trained = [r[len(opened):] if opened and r.startswith(opened) else r for r in (REPLY_1, REPLY_2)]
    targets = [t for t in sample.labels.tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(targets) == trained[0] + end + trained[1] + end
    assert targets.count(template.stop_token_id) == 2
    assert template.stop_token_id == tokenizer.convert_tokens_to_ids(end)


def test_r1_distill_stop_token_and_reserved_markers(tokenizers):
    template = ChatTemplate(tokenizers["r1-distill"], TemplateConfig(tokens_per_tile=TOKENS_PER_TILE))
    assert template.stop_token_id == tokenizers["r1-distill"].convert_tokens_to_ids("<｜end▁of▁sentence｜>")
    assert template.open_think
    with pytest.raises(ValueError, match="sample x: question contains the special token '<｜User｜>'"):
        template.prompt_ids("x", "What about <｜User｜> here?")
    with pytest.raises(ValueError, match="response contains the special token '<｜end▁of▁sentence｜>'"):
        template.encode("x", "Q?", "A<｜end▁of▁sentence｜>")
    # <think> and </think> are allowed in text: replies hold them.
    assert template.encode("x", "Q?", REPLY_1).labels.ne(IGNORE_INDEX).any()


def test_qwen25_family_keeps_a_think_opening_in_the_reply(tokenizers):
    template = ChatTemplate(tokenizers["qwen2.5"], TemplateConfig(tokens_per_tile=TOKENS_PER_TILE))
    assert not template.open_think
    sample = template.encode("x", "Q?", REPLY_1)
    reply = [t for t in sample.labels.tolist() if t != IGNORE_INDEX]
    assert tokenizers["qwen2.5"].decode(reply) == REPLY_1 + "<|im_end|>"  # <think> is the model's to write


def test_tokenizer_without_chat_template_falls_back_to_qwq_with_a_warning(tokenizers):
    tokenizer = tokenizers["qwq"]
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.warns(UserWarning, match="has no chat_template: using the qwq family"):
            found = resolve_chat_format(tokenizer)
    finally:
        tokenizer.chat_template = saved
    assert found.reply_end == "<|im_end|>" and found.think_prefix == "<think>\n"


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('no system role') }}", "does not render a \\['system', 'user', 'assistant', 'user', "
                                                 "'assistant'\\] conversation: .*no system role"),
    ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", "closes a reply with '\\\\n', which does not start "
                                                                 "with an added token"),
    ("{% for m in messages %}{{ m['content'] + m['content'] }}{% endfor %}", "does not render each message once"),
])
def test_templates_of_another_shape_are_named(tokenizers, template, message):
    with pytest.raises(ChatFormatError, match=message):
        derive_chat_format(tokenizers["qwq"], template, "the test template")


def test_auto_error_names_the_tokenizer_and_the_override(tokenizers):
    tokenizer = tokenizers["qwq"]
    saved, tokenizer.chat_template = tokenizer.chat_template, "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        with pytest.raises(ChatFormatError, match=r"the chat_template of .*qwq.*set data.chat_template"):
            resolve_chat_format(tokenizer)
    finally:
        tokenizer.chat_template = saved


def test_another_familys_markers_are_refused(tokenizers):
    # The qwq tokenizer has no <｜User｜>: the R1 markers would be split into plain text.
    with pytest.raises(ChatFormatError, match="closes a reply|does not have as tokens"):
        resolve_chat_format(tokenizers["qwq"], "r1-distill")
    with pytest.raises(ChatFormatError, match="is not one of auto, qwq, qwen2.5, r1-distill"):
        resolve_chat_format(tokenizers["qwq"], "llama3")


def test_config_validates_chat_template():
    from megatron_r1v.config import DataConfig
    from megatron_r1v.validation import check_data_config

    check_data_config(DataConfig(chat_template="r1-distill"))
    with pytest.raises(ValueError, match="data.chat_template must be one of auto, qwq, qwen2.5, r1-distill, "
                                         "got 'chatml'"):
        check_data_config(DataConfig(chat_template="chatml"))


def test_chat_format_record_is_frozen():
    fmt = ChatFormat("x", "", "", "", "", "", "<e>", "")
    with pytest.raises(AttributeError):
        fmt.reply_end = "y"  # type: ignore[misc]


def test_generation_tools_follow_the_family(tmp_path, tokenizers):
    """evaluate / rejection_sample on an R1-Distill-family checkpoint: prompts in its markers,
    generation stops at <｜end▁of▁sentence｜>, which the kept reply does not include."""
    from tool_modules import load_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

    from megatron_r1v.config import DataConfig
    from megatron_r1v.data.synthetic import generate_dataset
    from megatron_r1v.evaluate import build_requests, prepare_generation
    from megatron_r1v.rollout.engine import RolloutSample

    tools = {name: load_tool(name) for name in ("make_tiny_checkpoint", "rejection_sample")}
    tools["make_tiny_checkpoint"].make_tiny_checkpoint(tmp_path / "model",
                                                       tokenizer_dir=tokenizers["r1-distill"].name_or_path)
    generate_dataset(tmp_path / "data", num=2, seed=0)
    run = prepare_generation(tmp_path / "model", tmp_path / "data" / "prompts.jsonl", None, 2, 8, 0, None, "cpu",
                             DataConfig(max_tiles=2, tiler="pil"))
    eos = tokenizers["r1-distill"].convert_tokens_to_ids("<｜end▁of▁sentence｜>")
    assert run.stop_ids == (eos,) and run.think_opened
    (request,) = build_requests(run, run.records[:1])
    prompt = tokenizers["r1-distill"].decode(request.prompt_ids.tolist())
    assert prompt.startswith("<｜begin▁of▁sentence｜>") and prompt.endswith("<｜Assistant｜><think>\n")
    assert "<|im_start|>" not in prompt
    record = run.records[0]
    text = f"I see it.\n</think>\n\nThe answer is \\boxed{{{record.answer}}}.<｜end▁of▁sentence｜>"
    ids = torch.tensor([1, 2, eos])
    sample = RolloutSample(record.id, ids, torch.zeros(3), True, text)
    response = tools["rejection_sample"].judge(record, sample, run.loader.template)
    assert response.text == text[:-len("<｜end▁of▁sentence｜>")] and response.accepted, response
    leaked = RolloutSample(record.id, ids, torch.zeros(3), True, "x<｜User｜>" + text)
    assert tools["rejection_sample"].judge(record, leaked, run.loader.template).reason == "special token in text"
