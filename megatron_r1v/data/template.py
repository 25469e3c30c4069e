"""The model family's chat template, with InternVL's image-token expansion.

The turn markers are the tokenizer's (``data.chat_format``: read from its ``chat_template``;
``TemplateConfig.chat_template`` can name a family instead). For QwQ / R1V2:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{question, each <image> -> <img><IMG_CONTEXT> x (tokens_per_tile x tiles)</img>}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{response}<|im_end|>

and for DeepSeek-R1-Distill-Qwen / R1V:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{question, images expanded}
    <｜Assistant｜><think>\\n{response}<｜end▁of▁sentence｜>      (one line)

The assistant turn is opened with the family's generation prompt; when that opens the
thought (``<think>\\n``: QwQ, R1-Distill; ``ChatTemplate.open_think``), a response that
itself starts with ``<think>\\n`` has it removed rather than doubled. The reply's closing
token (``<|im_end|>``, ``<｜end▁of▁sentence｜>``) is trained on and is the rollout's stop
token (``ChatTemplate.stop_token_id``). A question with no ``<image>`` placeholder gets one
per image in front of the text (InternVL's rule). ``tokens_per_tile`` is 256 for 448px
InternViT tiles with pixel shuffle 0.5 (R1V2); tiny presets have fewer
(``R1VArch.tokens_per_tile``).

Conversations (SFT, :meth:`ChatTemplate.encode_conversation`) render every turn the same
way, one after the other (QwQ shown):

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{turn 1}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n{reply 1}<|im_end|>\\n
    <|im_start|>user\\n{turn 2}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n{reply 2}<|im_end|>

with labels on every reply and the token that closes it (not on the ``<think>\\n`` that
opens it: that is the generation prompt). Earlier replies are kept whole: QwQ's and
R1-Distill's inference templates drop the reasoning of earlier turns, but SFT trains on each
of them. The images of all user turns are numbered in order; with no placeholder anywhere
they go before the first user turn's text. A one-turn conversation gives exactly
:meth:`ChatTemplate.encode`'s ids and labels.

Token ids are assembled piece by piece (the markers and text encoded together, the image
tokens spliced in as ids), which is exactly what encoding the rendered text gives, because
Hugging Face tokenizers split at added tokens before BPE; a test holds the two equal, and
equal to the tokenizer's own ``apply_chat_template``. Text that contains a special token
literally (the image tokens, or a marker's) is rejected: it would silently add or remove
image tokens or turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch

from .chat_format import AUTO, ChatFormat, added_tokens, resolve_chat_format
from .schema import IMAGE_PLACEHOLDER, RESERVED_TEXT
from .tokenizer import IMG_CONTEXT, IMG_END, IMG_START, THINK_END, THINK_START

IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Think step by step, then give the final answer in \\boxed{}."


class OverlengthError(ValueError):
    """A sample longer than ``max_seq_len`` that the policy may not (or cannot) shorten."""


@dataclass(frozen=True)
class TemplateConfig:
    tokens_per_tile: int = 256
    """<IMG_CONTEXT> tokens per image tile (256 for InternViT-448px + pixel shuffle 0.5)."""
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT
    """None leaves the system turn out."""
    max_seq_len: int = 8192
    overlength: Literal["error", "truncate"] = "error"
    """``truncate`` cuts the response's end; a prompt (with its image tokens) is never cut."""
    chat_template: str = AUTO
    """``auto``: the turn markers of the tokenizer's ``chat_template``; or a family of
    ``data.chat_format.FAMILY_TEMPLATES`` (``qwq``, ``qwen2.5``, ``r1-distill``)."""


@dataclass
class EncodedSample:
    """One tokenized conversation. ``labels[t]`` is the target of position ``t`` (the next
    token) when that token belongs to the response, else ``IGNORE_INDEX``."""

    sample_id: str
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64
    prompt_len: int
    tiles_per_image: tuple[int, ...]
    num_image_tokens: int
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


Piece = Union[str, int]  # text (markers included), or the id of an image token


class ChatTemplate:
    """Renders and tokenizes conversations for one tokenizer and template configuration."""

    def __init__(self, tokenizer, config: TemplateConfig = TemplateConfig(), chat_format: Optional[ChatFormat] = None):
        if config.tokens_per_tile < 1 or config.max_seq_len < 1:
            raise ValueError(f"tokens_per_tile and max_seq_len must be >= 1, got {config}")
        self.tokenizer = tokenizer
        self.config = config
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')} lacks InternVL's image tokens "
                             f"{missing} (tools/assemble_checkpoint.py adds them)")
        self.format = chat_format or resolve_chat_format(tokenizer, config.chat_template)
        self.ids = {token: vocab[token] for token in (IMG_START, IMG_END, IMG_CONTEXT)}
        self.image_token_id = self.ids[IMG_CONTEXT]
        self.stop_token_id = int(vocab[self.format.reply_end])
        # The markers' added tokens may not appear in text either (the think tags may: replies hold them).
        markers = "".join(self.format.markers())
        marker_tokens = [t for t in sorted(added_tokens(tokenizer)) if t in markers and t not in (THINK_START, THINK_END)]
        self.reserved_text = tuple(dict.fromkeys([*RESERVED_TEXT, *marker_tokens]))

    @property
    def open_think(self) -> bool:
        """Whether the generation prompt opens the thought (``<think>\\n``): the format reward's
        ``think_opened_by_prompt``."""
        return self.format.opens_think

    def _user_pieces(self, sample_id: str, question: str, tiles_per_image: Sequence[int]) -> list[Piece]:
        n_placeholders = question.count(IMAGE_PLACEHOLDER)
        if n_placeholders == 0 and tiles_per_image:
            question = (IMAGE_PLACEHOLDER + "\n") * len(tiles_per_image) + question
        elif n_placeholders != len(tiles_per_image):
            raise ValueError(f"sample {sample_id}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholders "
                             f"for {len(tiles_per_image)} images")
        pieces: list[Piece] = []
        for i, text in enumerate(question.split(IMAGE_PLACEHOLDER)):
            if i:
                tiles = tiles_per_image[i - 1]
                if tiles < 1:
                    raise ValueError(f"sample {sample_id}: image {i - 1} has {tiles} tiles")
                pieces += [self.ids[IMG_START]] + [self.image_token_id] * (tiles * self.config.tokens_per_tile)
                pieces.append(self.ids[IMG_END])
            pieces.append(text)
        return pieces

    def _check_text(self, sample_id: str, field: str, text: str) -> None:
        for token in self.reserved_text:
            if token in text:
                raise ValueError(f"sample {sample_id}: {field} contains the special token {token!r} as text")

    def _prompt_pieces(self, sample_id: str, question: str, tiles_per_image: Sequence[int]) -> list[Piece]:
        self._check_text(sample_id, "question", question)
        return [*self._start_pieces(self.config.system_prompt),
                *self._user_pieces(sample_id, question, tiles_per_image),
                self.format.user_to_reply, self.format.think_prefix]

    def _start_pieces(self, system: Optional[str]) -> list[Piece]:
        """From the conversation's start to the first user turn's text."""
        if system is None:
            return [self.format.start_without_system]
        return [self.format.system_start, system, self.format.system_to_user]

    def _strip_think(self, reply: str) -> str:
        opened = THINK_START + "\n"
        return reply[len(opened):] if self.open_think and reply.startswith(opened) else reply

    def encode_conversation(self, sample_id: str, messages: Sequence, tiles_per_image: Sequence[int] = ()
                            ) -> EncodedSample:
        """A conversation (``data.schema.Message`` s: [system], user, assistant, ...; see the
        module docstring) with next-token labels on every assistant reply. ``prompt_len`` is
        the length before the first reply. Over ``max_seq_len``: an error, or with
        ``overlength: truncate`` the conversation's end is cut, never the first prompt or an
        image token."""
        ids, target = self._conversation_ids(sample_id, messages, tiles_per_image)
        prompt_len = target.index(True)
        max_len, truncated = self.config.max_seq_len, False
        if len(ids) > max_len:
            images_after = self._count_images(ids[max_len:])
            if self.config.overlength == "error" or prompt_len >= max_len or images_after:
                why = "" if self.config.overlength == "error" else (
                    f" and truncation would cut {images_after} image tokens" if images_after else
                    " and only the replies may be truncated (the first prompt holds image tokens)")
                raise OverlengthError(f"sample {sample_id}: the conversation has {len(ids)} tokens ({prompt_len} "
                                      f"before the first reply), more than max_seq_len {max_len}{why}")
            ids, target, truncated = ids[:max_len], target[:max_len], True
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        # Position t predicts token t+1: a target wherever token t+1 belongs to a reply.
        follows = torch.tensor(target[1:], dtype=torch.bool)
        labels[:-1][follows] = input_ids[1:][follows]
        return EncodedSample(sample_id, input_ids, labels, prompt_len, tuple(tiles_per_image),
                             self._count_images(ids), truncated)

    def _conversation_ids(self, sample_id: str, messages: Sequence, tiles_per_image: Sequence[int]
                          ) -> tuple[list[int], list[bool]]:
        """(token ids, whether each token is a reply target) of a whole conversation."""
        system, first = self.config.system_prompt, 0
        if messages and messages[0].role == "system":
            system, first = messages[0].content, 1
            self._check_text(sample_id, "messages[0].content", system)
        counts = self._image_counts(sample_id, messages, tiles_per_image)
        context: list[Piece] = self._start_pieces(system)
        ids: list[int] = []
        target: list[bool] = []
        used = 0
        for i, message in enumerate(messages[first:], first):
            self._check_text(sample_id, f"messages[{i}].content", message.content)
            expected = "user" if (i - first) % 2 == 0 else "assistant"
            if message.role != expected:
                raise ValueError(f"sample {sample_id}: messages[{i}] has role {message.role!r}, expected {expected!r} "
                                 "(after an optional first system message, user and assistant turns alternate)")
            if message.role == "user":
                context += self._user_pieces(sample_id, message.content, tiles_per_image[used:used + counts[i]])
                used += counts[i]
                continue
            context += [self.format.user_to_reply, self.format.think_prefix]
            prompt_ids = self._encode(context)
            reply_ids = self._encode([self._strip_think(message.content), self.format.reply_end])
            ids += prompt_ids + reply_ids
            target += [False] * len(prompt_ids) + [True] * len(reply_ids)
            context = [self.format.reply_to_user]
        if not any(target):
            raise ValueError(f"sample {sample_id}: the conversation has no assistant turn to train on")
        if messages[-1].role != "assistant":
            raise ValueError(f"sample {sample_id}: the conversation must end with an assistant turn")
        return ids, target

    @staticmethod
    def _image_counts(sample_id: str, messages: Sequence, tiles_per_image: Sequence[int]) -> list[int]:
        """How many of the images each message holds (its ``<image>`` placeholders)."""
        counts = [m.content.count(IMAGE_PLACEHOLDER) if m.role == "user" else 0 for m in messages]
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if not any(counts) and tiles_per_image and users:  # InternVL's rule: before the first user turn's text
            counts[users[0]] = len(tiles_per_image)
        if sum(counts) != len(tiles_per_image):
            raise ValueError(f"sample {sample_id}: {sum(counts)} {IMAGE_PLACEHOLDER} placeholders for "
                             f"{len(tiles_per_image)} images")
        return counts

    def _encode(self, pieces: Sequence[Piece]) -> list[int]:
        ids: list[int] = []
        text = ""
        for piece in list(pieces) + [None]:
            if isinstance(piece, str):
                text += piece
                continue
            if text:
                ids += self.tokenizer(text, add_special_tokens=False)["input_ids"]
                text = ""
            if piece is not None:
                ids.append(piece)
        return ids

    def render_prompt(self, question: str, tiles_per_image: Sequence[int] = ()) -> str:
        """The prompt as text (image tokens written out); for inspection and the equality test."""
        names = {v: k for k, v in self.ids.items()}
        return "".join(p if isinstance(p, str) else names[p] for p in self._prompt_pieces("-", question, tiles_per_image))

    def prompt_ids(self, sample_id: str, question: str, tiles_per_image: Sequence[int] = ()) -> torch.Tensor:
        """Token ids of the generation prompt (ends with the assistant header, e.g.
        ``<|im_start|>assistant\\n<think>\\n``)."""
        ids = self._encode(self._prompt_pieces(sample_id, question, tiles_per_image))
        if len(ids) > self.config.max_seq_len:
            raise OverlengthError(f"sample {sample_id}: prompt has {len(ids)} tokens (with "
                                  f"{self._count_images(ids)} image tokens), max_seq_len is {self.config.max_seq_len}")
        return torch.tensor(ids, dtype=torch.long)

    def _count_images(self, ids: Sequence[int]) -> int:
        return sum(1 for i in ids if i == self.image_token_id)

    def encode(self, sample_id: str, question: str, response: str, tiles_per_image: Sequence[int] = ()) -> EncodedSample:
        """Prompt + response + the reply's closing token with next-token labels on the response only."""
        self._check_text(sample_id, "response", response)
        prompt = self.prompt_ids(sample_id, question, tiles_per_image).tolist()
        answer = self._encode([self._strip_think(response), self.format.reply_end])
        max_len, truncated = self.config.max_seq_len, False
        if len(prompt) + len(answer) > max_len:
            if self.config.overlength == "error" or len(prompt) >= max_len:
                raise OverlengthError(
                    f"sample {sample_id}: {len(prompt)} prompt + {len(answer)} response tokens exceed max_seq_len "
                    f"{max_len}" + ("" if self.config.overlength == "error" else
                                    " and only the response may be truncated (the prompt holds image tokens)"))
            answer, truncated = answer[: max_len - len(prompt)], True
        input_ids = torch.tensor(prompt + answer, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        # Position t predicts token t+1: targets for positions prompt_len-1 .. L-2.
        labels[len(prompt) - 1: -1] = input_ids[len(prompt):]
        return EncodedSample(sample_id, input_ids, labels, len(prompt), tuple(tiles_per_image),
                             self._count_images(prompt), truncated)
