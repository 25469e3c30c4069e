"""SFT data: the "sft" JSONL schema (every malformed case gives its exact `FILE:LINE: message`),
the multi-turn chat template's labels (on every assistant reply and its <|im_end|>, nothing
else), the SFT loader, packing, and the token-mean loss of a step split into micro-batches."""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_r1v.data.loader import SFTLoader
from megatron_r1v.data.packing import pack_conversations
from megatron_r1v.data.schema import DataError, Message, SFTRecord, load_records, read_records
from megatron_r1v.data.template import IGNORE_INDEX, ChatTemplate, OverlengthError, TemplateConfig
from megatron_r1v.data.tiling import PILTiler, TilingConfig
from megatron_r1v.data.tokenizer import build_tokenizer
from megatron_r1v.data.validate import main as validate_main
from megatron_r1v.losses.sft import sft_loss

PER_TILE = 4
Q1 = "<image>\nHow many red circles are there?"
A1 = "<think>\nI count 2 + 1 = 3 circles.\n</think>\n\nThe answer is \\boxed{3}."
Q2 = "And in this one? <image>"
A2 = "There are \\boxed{5}."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def conversation(**fields):
    record = {"id": "c1", "images": ["a.png", "b.png"], "messages": [user(Q1), assistant(A1), user(Q2), assistant(A2)]}
    record.update(fields)
    return record


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (60, 40), (200, 10, 10)).save(tmp_path / name)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def write(path: Path, *records) -> Path:
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in records))
    return path


# --- schema ------------------------------------------------------------------------------

def test_valid_conversations_load(folder):
    path = write(folder / "sft.jsonl",
                 conversation(),
                 conversation(id=2, images=[], messages=[{"role": "system", "content": "Be brief."}, user("Hi"),
                                                         assistant("Hello.")]),
                 conversation(id="c3", images=["a.png"], messages=[user("No placeholder here."), assistant("Ok.")]))
    records = load_records(path, "sft").records
    assert [r.id for r in records] == ["c1", "2", "c3"]
    assert records[0] == SFTRecord("c1", (folder / "a.png", folder / "b.png"),
                                   (Message("user", Q1), Message("assistant", A1), Message("user", Q2),
                                    Message("assistant", A2)))
    assert records[1].messages[0] == Message("system", "Be brief.") and records[1].images == ()


MALFORMED = [
    (conversation(messages="hi"), 'messages: expected a non-empty array of {"role", "content"} objects, got string'),
    (conversation(messages=[]), 'messages: expected a non-empty array of {"role", "content"} objects, got an empty '
                                "array"),
    (conversation(messages=[user(Q1), "x"]), "messages[1]: expected an object with 'role' and 'content', got string"),
    (conversation(messages=[user(Q1), {"role": "assistant", "contents": "x"}]),
     ("messages[1]: unknown field 'contents' (did you mean 'content'?)", "messages[1]: missing field 'content'")),
    (conversation(messages=[user(Q1), {"role": "assistant"}]), "messages[1]: missing field 'content'"),
    (conversation(messages=[user(Q1), {"role": "bot", "content": "x"}]),
     "messages[1].role: 'bot' is not one of 'system', 'user', 'assistant'"),
    (conversation(messages=[user(Q1), assistant("")]), "messages[1].content: empty text"),
    (conversation(messages=[user(Q1), assistant("a <|im_end|> b")]),
     "messages[1].content: contains the special token(s) <|im_end|> as text"),
    (conversation(images=["a.png"], messages=[user(Q1), {"role": "system", "content": "x"}, assistant("y")]),
     "messages[1].role: 'system' is allowed only as the first message"),
    (conversation(images=["a.png"], messages=[assistant("x"), user(Q1), assistant("y")]),
     "messages[0].role: expected a user turn after an optional system message, got 'assistant' (turns alternate "
     "user, assistant, ...)"),
    (conversation(messages=[user(Q1), user(Q2), assistant("y")]),
     "messages[1].role: expected an assistant turn after the user turn, got 'user' (turns alternate user, "
     "assistant, ...)"),
    (conversation(images=["a.png"], messages=[user(Q1)]),
     "messages: no assistant turn; an SFT conversation needs one to train on"),
    (conversation(messages=[user(Q1), assistant(A1), user(Q2)]),
     "messages[2].role: the last message must be an assistant turn, got 'user' (a trailing user turn has nothing "
     "to train on)"),
    (conversation(images=["a.png"], messages=[user("Look."), assistant("At <image>?")]),
     "messages[1].content: <image> placeholders go in user turns only (this is the assistant message)"),
    (conversation(images=["a.png"]), "messages: 2 <image> placeholder(s) in the user turns but 1 image(s); use one "
                                     "per image, or none to put the images before the first user turn's text"),
    (conversation(images=["a.png", "missing.png"]), "images[1]: 'missing.png' ("),
    (conversation(images=["a.png", "corrupt.png"]), "images[1]: 'corrupt.png' ("),
    (conversation(chosen="x"), "unknown field 'chosen'"),
    ({"id": "c1", "images": []}, "missing field 'messages'"),
]


@pytest.mark.parametrize("record, message", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_each_problem_is_named_with_file_and_line(folder, record, message):
    path = write(folder / "sft.jsonl", conversation(id="ok"), record)
    records, problems = read_records(path, "sft")
    assert [r.id for r in records] == ["ok"]
    messages = message if isinstance(message, tuple) else (message,)
    assert len(problems) == len(messages), problems
    for problem, expected in zip(problems, messages):
        assert str(problem).startswith(f"{path}:2: {expected}"), str(problem)


def test_bad_records_error_or_are_skipped(folder, caplog):
    path = write(folder / "sft.jsonl", conversation(id="ok"), "{oops",
                 conversation(id="bad", images=["a.png"], messages=[user(Q1)]))
    with pytest.raises(DataError, match=r"2 problem\(s\) in 2 record\(s\)") as info:
        load_records(path, "sft")
    assert [p.line for p in info.value.problems] == [2, 3]
    with caplog.at_level(logging.WARNING):
        loaded = load_records(path, "sft", on_bad_sample="skip")
    assert [r.id for r in loaded.records] == ["ok"] and loaded.skipped == 2
    assert "skipped 2 of 3 sft record(s)" in caplog.text


def test_validate_cli_accepts_the_sft_kind(folder, capsys):
    path = write(folder / "sft.jsonl", conversation(), conversation(id="x", messages=[user(Q1), user(Q2)]))
    assert validate_main([str(path), "--kind", "sft"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: messages[1].role: expected an assistant turn" in out
    assert f"{path}: 2 sft record(s) read, 1 valid, 1 problem(s) in 1 record(s)" in out


# --- template ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tok")
    corpus = write(root / "c.jsonl", *[{"messages": [user(Q1 + Q2), assistant(A1 + A2 + f" {i} of them")]}
                                       for i in range(20)])
    build_tokenizer([corpus], 600, root / "tokenizer")
    return AutoTokenizer.from_pretrained(str(root / "tokenizer"))


def _messages(*turns):
    return [Message(role, text) for role, text in turns]


TWO_TURNS = _messages(("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2))


def _label_spans(sample) -> list[list[int]]:
    """The runs of consecutive labelled positions, as the token ids they predict."""
    spans, current = [], []
    for label in sample.labels.tolist() + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans, current = spans + [current], []
    return spans


def test_multi_turn_labels_are_every_reply_and_its_end(tokenizer):
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=PER_TILE))
    sample = template.encode_conversation("c", TWO_TURNS, (1, 3))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = [A1[len("<think>\n"):], A2]  # the opening <think>\n is the generation prompt, not a target
    expected = [tokenizer(r, add_special_tokens=False).input_ids + [end] for r in replies]
    assert _label_spans(sample) == expected
    # Labels are next-token targets: label[t] == input_ids[t + 1] wherever set.
    ids, labels = sample.input_ids, sample.labels
    set_ = labels != IGNORE_INDEX
    assert torch.equal(labels[:-1][set_[:-1]], ids[1:][set_[:-1]]) and labels[-1] == IGNORE_INDEX
    assert int(set_.sum()) == sum(map(len, expected))
    # The whole conversation is exactly the rendered text tokenized (special tokens split first).
    rendered = (template.render_prompt(Q1, (1,)) + replies[0] + "<|im_end|>\n<|im_start|>user\nAnd in this one? <img>"
                + "<IMG_CONTEXT>" * 3 * PER_TILE + "</img><|im_end|>\n<|im_start|>assistant\n<think>\n" + A2
                + "<|im_end|>")
    assert ids.tolist() == tokenizer(rendered, add_special_tokens=False).input_ids
    assert sample.num_image_tokens == 4 * PER_TILE and sample.tiles_per_image == (1, 3)
    assert sample.prompt_len == len(template.prompt_ids("c", Q1, (1,)))


def test_one_turn_equals_encode_and_system_message_replaces_the_default(tokenizer):
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=PER_TILE))
    one = template.encode_conversation("c", TWO_TURNS[:2], (2,))
    plain = template.encode("c", Q1, A1, (2,))
    assert torch.equal(one.input_ids, plain.input_ids) and torch.equal(one.labels, plain.labels)
    assert one.prompt_len == plain.prompt_len
    custom = template.encode_conversation("c", _messages(("system", "Be brief."), *[(m.role, m.content)
                                                                                    for m in TWO_TURNS[:2]]), (2,))
    text = tokenizer.decode(custom.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<img>")
    assert "helpful assistant" not in text and _label_spans(custom) == _label_spans(one)


def test_images_without_placeholders_go_before_the_first_user_turn(tokenizer):
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=PER_TILE, system_prompt=None))
    sample = template.encode_conversation("c", _messages(("user", "Count."), ("assistant", "3"), ("user", "Sure?"),
                                                         ("assistant", "Yes")), (2, 1))
    text = tokenizer.decode(sample.input_ids)
    image = "<img>" + "<IMG_CONTEXT>" * 2 * PER_TILE + "</img>\n<img>" + "<IMG_CONTEXT>" * PER_TILE + "</img>\n"
    assert text.startswith("<|im_start|>user\n" + image + "Count.<|im_end|>")
    with pytest.raises(ValueError, match="sample c: 2 <image> placeholders for 1 images"):
        template.encode_conversation("c", TWO_TURNS, (1,))


def test_overlength_errors_or_truncates_the_end(tokenizer):
    full = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=PER_TILE)).encode_conversation("c", TWO_TURNS, (1, 1))
    first_reply_end = len(ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=PER_TILE)).encode_conversation(
        "c", TWO_TURNS[:2], (1,)))
    short = TemplateConfig(tokens_per_tile=PER_TILE, max_seq_len=first_reply_end)
    with pytest.raises(OverlengthError, match=rf"sample c: the conversation has {len(full)} tokens \("
                                              rf"{full.prompt_len} before the first reply\), more than max_seq_len"):
        ChatTemplate(tokenizer, short).encode_conversation("c", TWO_TURNS, (1, 1))
    # Truncation may not cut the second turn's image tokens ...
    cut = TemplateConfig(tokens_per_tile=PER_TILE, max_seq_len=first_reply_end, overlength="truncate")
    with pytest.raises(OverlengthError, match=f"truncation would cut {PER_TILE} image tokens"):
        ChatTemplate(tokenizer, cut).encode_conversation("c", TWO_TURNS, (1, 1))
    # ... but cuts a text-only second turn's end: the first reply keeps all its labels.
    text_turns = TWO_TURNS[:2] + _messages(("user", "Sure?"), ("assistant", A1))
    whole = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=PER_TILE)).encode_conversation("c", text_turns, (1,))
    keep = first_reply_end + 8
    sample = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=PER_TILE, max_seq_len=keep, overlength="truncate")
                          ).encode_conversation("c", text_turns, (1,))
    assert sample.truncated and len(sample) == keep and torch.equal(sample.input_ids, whole.input_ids[:keep])
    assert torch.equal(sample.labels[:-1], whole.labels[:keep - 1]) and sample.labels[-1] == IGNORE_INDEX


# --- loader, packing, loss -----------------------------------------------------------------

def test_loader_packs_conversations_and_skips_bad_images(folder, tokenizer, caplog):
    path = write(folder / "sft.jsonl", conversation(id="a"), conversation(id="b", images=["b.png", "a.png"]),
                 conversation(id="c", images=["a.png"], messages=[user("Hi"), assistant("Hello.")]))
    records = load_records(path, "sft").records
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=PER_TILE))
    tiler = PILTiler(TilingConfig(image_size=56, max_tiles=4))
    loader = SFTLoader(records, template, tiler, seed=0)
    items = loader.next_batch(3)
    assert sorted(it.record.id for it in items) == ["a", "b", "c"]
    for it in items:
        assert it.pixel_values.shape[0] == sum(it.sample.tiles_per_image) and it.sample.num_image_tokens == \
            PER_TILE * sum(it.sample.tiles_per_image)
    rows = pack_conversations(items, 2 * max(len(it.sample) for it in items), pipeline=False)
    assert sorted(i for r in rows for i in r.sample_indices) == [0, 1, 2]
    assert sum(int(r.loss_mask.sum()) for r in rows) == sum(int((it.sample.labels != IGNORE_INDEX).sum())
                                                            for it in items)
    (folder / "a.png").write_bytes(b"broken")  # after validation: found when tiling
    skipping = SFTLoader(records, template, PILTiler(TilingConfig(image_size=56, on_bad_sample="skip")), seed=0,
                         on_bad_sample="skip")
    with caplog.at_level(logging.WARNING):
        assert skipping.next_batch(3) == []
    assert skipping.cursor.skipped == 3 and "skipping conversation" in caplog.text


def test_token_mean_loss_adds_up_over_micro_batches():
    """sum over micro-batches of sft_loss(part, N) == token-mean CE of the whole step (fp64)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 11, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 11, (30,), generator=gen)
    mask = (torch.rand(30, generator=gen) < 0.6).double()
    logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    n = int(mask.sum())
    parts = sum(sft_loss(logp[a:b], mask[a:b], n) for a, b in ((0, 7), (7, 19), (19, 30)))
    reference = torch.nn.functional.cross_entropy(logits[mask.bool()], targets[mask.bool()])
    assert float(parts) == pytest.approx(float(reference), rel=1e-12)
    with pytest.raises(ValueError, match="step_tokens must be >= 1"):
        sft_loss(logp, mask, 0)
