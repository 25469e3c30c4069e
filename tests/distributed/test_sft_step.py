"""The SFT step (``trainer/sft_step.py``: token-mean NLL of the assistant replies) through
Megatron's schedules equals a per-sample transformers reference at TP=2, PP=2 and DP=2:
the loss, its token count and every gradient (vision tower, adapter, decoder; ``model.freeze=all``).

The conversations go through the real chat template (``ChatTemplate.encode_conversation``:
multi-turn, images in several turns, a system message, a text-only one) with a character
tokenizer whose special tokens sit where ``data/tokenizer.py`` puts them for the tiny-r1v
vocabulary (``<IMG_CONTEXT>`` = 250 = the preset's image token). The reference finds the
assistant replies in the token ids itself (after ``<|im_start|>assistant\\n<think>\\n``, up to
and including the ``<|im_end|>`` that closes each), runs transformers'
InternVLForConditionalGeneration on each conversation alone and takes plain torch
cross-entropy over those tokens: sum / number of reply tokens of the whole step.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from megatron_r1v.data.schema import Message
from megatron_r1v.data.template import IGNORE_INDEX, ChatTemplate, TemplateConfig
from megatron_r1v.data.tokenizer import IM_END, IM_START, THINK_START, special_token_ids
from megatron_r1v.models.r1v.presets import get_preset

WORKER = "tests/distributed/workers/sft_step_worker.py"
ARCH = get_preset("tiny-r1v")
VOCAB = ARCH.decoder.vocab_size  # 251
SPECIAL = special_token_ids(VOCAB)  # <|endoftext|> = 243 ... <IMG_CONTEXT> = 250
SIDE = ARCH.vision.image_size
PARTS = {"vision": "model.vision_tower.", "adapter": "model.multi_modal_projector."}  # anything else: decoder
# fp32 on both sides; packing, TP-split matmuls and their all-reduces, the 1F1B pipeline, DP
# gradient averaging and the fused log-prob kernel only reorder sums. Measured here: max |diff|
# <= 3.2e-7 x the largest |gradient| of the same part (vision, adapter, decoder; every layout),
# as test_vision_grads.py measures (<= 7.7e-7) for the same model; 1e-5 x that scale keeps
# > 30x margin, while a wrong normalization (DDP's mean over DP not undone: every gradient
# halved) fails the DP=2 case (checked). The loss: a mean CE of ~5.5 in reordered fp32 sums: rel 1e-5.
GRAD_ATOL_VS_SCALE, GRAD_RTOL, LOSS_RTOL = 1e-5, 1e-4, 1e-5


class CharTokenizer:
    """One token per character (id = code point mod 243); special tokens written in the text
    (e.g. ``</think>`` in a reply) are split out first, as Hugging Face tokenizers do."""

    def get_vocab(self) -> dict:
        return dict(SPECIAL)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        assert not add_special_tokens
        ids, i = [], 0
        while i < len(text):
            token = next((t for t in SPECIAL if text.startswith(t, i)), None)
            ids.append(SPECIAL[token] if token else ord(text[i]) % SPECIAL["<|endoftext|>"])
            i += len(token) if token else 1
        return {"input_ids": ids}


def _conversations() -> list[tuple[list[Message], tuple[int, ...]]]:
    def m(*turns):
        return [Message(role, text) for role, text in turns]

    return [
        (m(("user", "<image>\nWhat is shown?"), ("assistant", "<think>\nA red dot.\n</think>\n\nA dot.")), (1,)),
        (m(("system", "Be brief."), ("user", "Count them. <image>"), ("assistant", "3"),
           ("user", "And here? <image>"), ("assistant", "<think>\nfive\n</think>\n\n5")), (2, 1)),
        (m(("user", "Hello"), ("assistant", "Hi there."), ("user", "Bye"), ("assistant", "Goodbye.")), ()),
        (m(("user", "Describe."), ("assistant", "Squares and circles.")), (3,)),  # images before the text
        (m(("user", "<image> left, <image> right: same?"), ("assistant", "No.")), (1, 1)),
        (m(("user", "Sum? <image>"), ("assistant", "<think>\n2+2\n</think>\n\n\\boxed{4}"), ("user", "Sure?"),
           ("assistant", "Yes, 4.")), (2,)),
    ]


def reply_positions(ids: list[int]) -> torch.Tensor:
    """Whether each token belongs to an assistant reply (its <|im_end|> included), found in the ids."""
    tok = CharTokenizer()
    header = [SPECIAL[IM_START]] + tok("assistant\n")["input_ids"] + [SPECIAL[THINK_START]] + tok("\n")["input_ids"]
    inside = torch.zeros(len(ids), dtype=torch.bool)
    i = 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            i += len(header)
            while ids[i] != SPECIAL[IM_END]:
                inside[i] = True
                i += 1
            inside[i] = True
        i += 1
    return inside


@pytest.fixture(scope="module")
def hf_model(internvl):
    """The session's tiny random InternVL reference (tests/distributed/conftest.py), as saved."""
    import transformers

    model = transformers.InternVLForConditionalGeneration.from_pretrained(internvl["hf_dir"],
                                                                          attn_implementation="eager")
    assert model.config.image_token_id == SPECIAL["<IMG_CONTEXT>"]  # the template's image tokens are its own
    return model.float().eval()


@pytest.fixture(scope="module")
def reference(hf_model, tmp_path_factory):
    """The conversations encoded, and the step's token-mean CE with every gradient, from transformers."""
    template = ChatTemplate(CharTokenizer(), TemplateConfig(tokens_per_tile=ARCH.tokens_per_tile, system_prompt=None))
    gen = torch.Generator().manual_seed(5)
    samples, encoded = [], []
    for k, (messages, tiles) in enumerate(_conversations()):
        sample = template.encode_conversation(f"c{k}", messages, tiles)
        pixels = torch.randn(sum(tiles), 3, SIDE, SIDE, generator=gen) if tiles else None
        # The template's labels are exactly the next tokens inside the replies found here.
        inside = reply_positions(sample.input_ids.tolist())
        expected = torch.where(inside[1:], sample.input_ids[1:], IGNORE_INDEX)
        assert torch.equal(sample.labels[:-1], expected) and sample.labels[-1] == IGNORE_INDEX, k
        encoded.append((sample.input_ids, inside, pixels))
        samples.append({"id": sample.sample_id, "input_ids": sample.input_ids, "labels": sample.labels,
                        "prompt_len": sample.prompt_len, "tiles": sample.tiles_per_image,
                        "image_tokens": sample.num_image_tokens, "pixel_values": pixels})
    tokens = sum(int(inside[1:].sum()) for _, inside, _ in encoded)
    hf_model.zero_grad()
    total = torch.zeros(())
    for ids, inside, pixels in encoded:
        logits = hf_model(input_ids=ids[None], pixel_values=pixels).logits[0].float()
        total = total + F.cross_entropy(logits[:-1][inside[1:]], ids[1:][inside[1:]], reduction="sum")
    loss = total / tokens
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in hf_model.named_parameters()}
    hf_model.zero_grad()
    root = tmp_path_factory.mktemp("sft_cases")
    torch.save({"samples": samples}, root / "cases.pt")
    return {"loss": float(loss.detach()), "tokens": tokens, "grads": grads, "cases": root / "cases.pt",
            "lengths": [len(s["input_ids"]) for s in samples]}


def _part(name: str) -> str:
    return next((part for part, prefix in PARTS.items() if name.startswith(prefix)), "decoder")


LAYOUTS = {"tp2": ("--tp", 2), "pp2": ("--pp", 2), "dp2": (None, 2)}
_D, _H = ARCH.vision.head_dim, ARCH.vision.hidden_size
DUMMY_ENTRIES_TP2 = ARCH.vision.num_layers * (3 * _D * _H + 2 * _D + _H * _D)  # TP=2 pads 3 heads to 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sft_step_with_images_matches_per_sample_transformers(layout, reference, internvl, torchrun, tmp_path):
    flag, size = LAYOUTS[layout]
    torchrun(WORKER, size, ["--hf-file", str(internvl["weights"]), "--cases", str(reference["cases"]),
                            "--out", str(tmp_path), *([flag, str(size)] if flag else [])])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["tokens"] == reference["tokens"]
    assert result["loss"] == pytest.approx(reference["loss"], rel=LOSS_RTOL)
    # Rank 0 packed its share (every dp-th conversation) with all their tiles, several to a row.
    mine = _conversations()[::size if layout == "dp2" else 1]
    assert sum(result["samples_per_row"]) == len(mine) and max(result["samples_per_row"]) >= 2, result
    assert sum(result["tiles_per_row"]) == sum(sum(tiles) for _, tiles in mine), result
    grads, ref = load_file(str(tmp_path / "grads.safetensors")), reference["grads"]
    assert set(grads) == set(ref)
    scale = {part: max(g.abs().max().item() for n, g in ref.items() if _part(n) == part) for part in
             ("vision", "adapter", "decoder")}
    assert min(scale.values()) > 0, scale  # every part gets a gradient, so matching it means something
    worst = dict.fromkeys(scale, 0.0)
    for name, want in ref.items():
        part = _part(name)
        worst[part] = max(worst[part], (grads[name] - want).abs().max().item() / scale[part])
        torch.testing.assert_close(grads[name], want, atol=GRAD_ATOL_VS_SCALE * scale[part], rtol=GRAD_RTOL,
                                   msg=lambda m: f"{layout} {name}: {m}")
    print(f"sft {layout}: gradient scale per part {scale}, max |diff| / scale {worst}")
    assert (result["dummy_entries"], result["dummy_grad_max_abs"]) == (DUMMY_ENTRIES_TP2 if layout == "tp2" else 0, 0.0)
