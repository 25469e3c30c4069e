"""Tokenizer for tiny models, the QwQ / R1V2 chat template, and first-fit-decreasing packing."""

from __future__ import annotations

import json
import random

import pytest
import torch

from megatron_r1v.data.packing import first_fit_decreasing, pack_samples
from megatron_r1v.data.template import IGNORE_INDEX, ChatTemplate, OverlengthError, TemplateConfig
from megatron_r1v.data.tokenizer import SPECIAL_TOKENS, build_tokenizer, special_token_ids

VOCAB = 600
QUESTION = "<image>\nHow many red circles are there? Compare with <image> too."
RESPONSE = "<think>\nI count 2 + 1 = 3 circles.\n</think>\n\nThe answer is \\boxed{3}."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tok")
    corpus = root / "prompts.jsonl"
    rows = [{"id": i, "question": f"How many {c} shapes are there in picture {i}?", "answer": str(i),
             "chosen": f"<think>\nThere are {i} {c} shapes.\n</think>\n\nThe answer is \\boxed{{{i}}}."}
            for i, c in enumerate(["red", "green", "blue", "yellow"] * 5)]
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = build_tokenizer([corpus], VOCAB, root / "tokenizer")
    assert summary["<IMG_CONTEXT>"] == VOCAB - 1
    return AutoTokenizer.from_pretrained(str(root / "tokenizer"))


def test_tokenizer_special_ids_fixed_and_loadable(tokenizer):
    assert len(tokenizer) == VOCAB
    ids = special_token_ids(VOCAB)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(VOCAB - 8, VOCAB))
    assert ids["<IMG_CONTEXT>"] == VOCAB - 1 and ids["<|endoftext|>"] == VOCAB - 8
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "Héllo wörld 12345 \\boxed{7}"  # byte-level: any UTF-8 round-trips
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    # Think tags survive skip_special_tokens (the format reward reads them); im_end does not.
    ids_ = tokenizer("<think>\nx</think>y<|im_end|>", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids_, skip_special_tokens=True) == "<think>\nx</think>y"


def test_tokenizer_errors(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"question": "hi"}\n')
    with pytest.raises(ValueError, match="vocab_size 200 is too small: a byte-level BPE needs at least 264"):
        build_tokenizer([corpus], 200, tmp_path / "t")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        build_tokenizer([corpus], 300, tmp_path / "exists")
    corpus.write_text('{"question": "hi"}\n{oops\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: not JSON"):
        build_tokenizer([corpus], 300, tmp_path / "t2")
    assert not (tmp_path / "t2").exists()


def test_piecewise_ids_equal_encoding_the_rendered_text(tokenizer):
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=4))
    tiles = (1, 3)
    sample = template.encode("s0", QUESTION, RESPONSE, tiles)
    rendered = template.render_prompt(QUESTION, tiles) + RESPONSE[len("<think>\n"):] + "<|im_end|>"
    assert sample.input_ids.tolist() == tokenizer(rendered, add_special_tokens=False).input_ids
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert "<|im_start|>assistant\n<think>\nI count" in rendered  # <think> opened once, not doubled


def test_image_expansion_and_labels(tokenizer):
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=4, system_prompt=None))
    sample = template.encode("s1", QUESTION, RESPONSE, (1, 3))
    ids = sample.input_ids.tolist()
    vocab = tokenizer.get_vocab()
    img, start, end = vocab["<IMG_CONTEXT>"], vocab["<img>"], vocab["</img>"]
    assert sample.num_image_tokens == ids.count(img) == 4 * (1 + 3)
    # Two <img> blocks, in order: 4 then 12 context tokens, nothing else inside.
    blocks = [(ids.index(start, 0), ids.index(end, 0))]
    blocks.append((ids.index(start, blocks[0][1]), ids.index(end, blocks[0][1] + 1)))
    assert [b - a - 1 for a, b in blocks] == [4, 12]
    assert all(ids[i] == img for a, b in blocks for i in range(a + 1, b))
    assert tokenizer.decode(ids[:2]) == "<|im_start|>user"  # no system turn
    # Labels: next-token targets over the response + <|im_end|>, nothing on the prompt.
    p = sample.prompt_len
    assert tokenizer.decode(ids[:p]).endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n")
    targets = sample.labels != IGNORE_INDEX
    assert targets.nonzero()[:, 0].tolist() == list(range(p - 1, len(ids) - 1))
    assert torch.equal(sample.labels[p - 1:-1], sample.input_ids[p:])
    assert tokenizer.decode(sample.labels[targets].tolist()) == RESPONSE[len("<think>\n"):] + "<|im_end|>"


def test_placeholders(tokenizer):
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=2, system_prompt=None))
    prepended = template.render_prompt("What is shown?", (2,))
    assert prepended.startswith("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat is shown?")
    with pytest.raises(ValueError, match=r"sample q: 2 <image> placeholders for 1 images"):
        template.prompt_ids("q", "<image> and <image>", (1,))
    with pytest.raises(ValueError, match=r"sample q: question contains the special token '<IMG_CONTEXT>' as text"):
        template.prompt_ids("q", "sneaky <IMG_CONTEXT>", ())
    with pytest.raises(ValueError, match=r"sample r: response contains the special token '<\|im_end\|>' as text"):
        template.encode("r", "hi", "done<|im_end|>more", ())
    text_only = template.encode("t", "What is 2+2?", "4", ())
    assert text_only.num_image_tokens == 0


def test_overlength_policies(tokenizer):
    cfg = dict(tokens_per_tile=8, system_prompt=None)
    full = ChatTemplate(tokenizer, TemplateConfig(**cfg)).encode("x", QUESTION, RESPONSE, (2, 1))
    limit = full.prompt_len + 5
    with pytest.raises(OverlengthError, match=rf"sample x: {full.prompt_len} prompt \+ \d+ response tokens exceed "
                                              rf"max_seq_len {limit}"):
        ChatTemplate(tokenizer, TemplateConfig(**cfg, max_seq_len=limit)).encode("x", QUESTION, RESPONSE, (2, 1))
    cut = ChatTemplate(tokenizer, TemplateConfig(**cfg, max_seq_len=limit, overlength="truncate")).encode(
        "x", QUESTION, RESPONSE, (2, 1))
    assert cut.truncated and len(cut) == limit
    assert torch.equal(cut.input_ids, full.input_ids[:limit])  # the prompt and its 24 image tokens intact
    assert cut.num_image_tokens == full.num_image_tokens == 24
    assert int((cut.labels != IGNORE_INDEX).sum()) == 5  # the 5 kept response tokens are targets of positions p-1..L-2
    # A prompt that does not fit cannot be truncated: image tokens are never cut.
    with pytest.raises(OverlengthError, match=r"sample x: prompt has \d+ tokens \(with 24 image tokens\), max_seq_len is 10"):
        ChatTemplate(tokenizer, TemplateConfig(**cfg, max_seq_len=10, overlength="truncate")).encode(
            "x", QUESTION, RESPONSE, (2, 1))


def optimal_bins(lengths: list[int], budget: int) -> int:
    best = len(lengths)

    def place(i: int, loads: list[int]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(lengths):
            best = len(loads)
            return
        for b in range(len(loads)):
            if loads[b] + lengths[i] <= budget:
                loads[b] += lengths[i]
                place(i + 1, loads)
                loads[b] -= lengths[i]
        place(i + 1, loads + [lengths[i]])

    place(0, [])
    return best


def test_first_fit_decreasing_known_plan_and_invariants():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 8) == [[0, 2], [1, 3, 6], [4, 5]]
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 40))]
        bins = first_fit_decreasing(lengths, 100)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    for _ in range(30):  # FFD's guarantee against the optimum, found by exhaustive search
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 8))]
        assert len(first_fit_decreasing(lengths, 100)) <= 11 / 9 * optimal_bins(lengths, 100) + 6 / 9
    with pytest.raises(ValueError, match="sample long has 9 tokens, more than the token budget 8"):
        first_fit_decreasing([3, 9], 8, names=["short", "long"])


def test_packed_batch_keeps_sample_boundaries(tokenizer):
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=2, system_prompt=None))
    samples = [template.encode("a", "<image> count", "two", (2,)), template.encode("b", "hello", "world", ()),
               template.encode("c", "<image><image> which", "left", (1, 1))]
    pixels = [torch.full((2, 3, 4, 4), 0.0), None, torch.stack([torch.full((3, 4, 4), 1.0), torch.full((3, 4, 4), 2.0)])]
    budget = len(samples[0]) + len(samples[2]) + 3
    batches = pack_samples(samples, pixels, budget, pad_id=tokenizer.pad_token_id, pad_to_multiple=4)
    assert sum(len(b.sample_ids) for b in batches) == 3
    for batch in batches:
        length = batch.input_ids.shape[1]
        assert length % 4 == 0 and batch.cu_seqlens[-1] == length
        members = [samples[i] for i in batch.sample_indices]
        offset = 0
        for sample in members:
            seg = slice(offset, offset + len(sample))
            assert torch.equal(batch.input_ids[0, seg], sample.input_ids)
            assert torch.equal(batch.labels[0, seg], sample.labels)
            assert batch.position_ids[0, seg].tolist() == list(range(len(sample)))
            offset += len(sample)
        assert (batch.labels[0, offset:] == IGNORE_INDEX).all() and (batch.loss_mask[0, offset:] == 0).all()
        expected_tiles = [pixels[i] for i in batch.sample_indices if pixels[i] is not None]
        if expected_tiles:
            assert torch.equal(batch.pixel_values, torch.cat(expected_tiles))
            n_img_tokens = int((batch.input_ids == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")).sum())
            assert n_img_tokens == 2 * batch.pixel_values.shape[0]

    # cu_seqlens (what the model's varlen attention reads) marks every sample, then the padding.
    for batch in batches:
        lengths = [len(samples[i]) for i in batch.sample_indices]
        padding = batch.input_ids.shape[1] - sum(lengths)
        expected = torch.tensor([0] + lengths + ([padding] if padding else [])).cumsum(0)
        assert batch.cu_seqlens.dtype == torch.int32 and torch.equal(batch.cu_seqlens.long(), expected)


def test_pack_errors(tokenizer):
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=2, system_prompt=None))
    sample = template.encode("img", "<image> x", "y", (3,))
    with pytest.raises(ValueError, match=r"sample img: 2 image tiles given, its tokens expect 3 \(\[3\] per image\)"):
        pack_samples([sample], [torch.zeros(2, 3, 4, 4)], 1000, pad_id=0)
    with pytest.raises(ValueError, match="1 samples but 0 pixel_values entries"):
        pack_samples([sample], [], 1000, pad_id=0)
