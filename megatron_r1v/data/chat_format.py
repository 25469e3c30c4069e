"""A model family's turn markers, read from its tokenizer's ``chat_template``.

The R1V generations inherit their chat format from their language model:

* qwq (QwQ-32B, R1V2): ``<|im_start|>system\\n{s}<|im_end|>\\n<|im_start|>user\\n{u}<|im_end|>\\n``
  ``<|im_start|>assistant\\n``, a reply closed by ``<|im_end|>``, the next turn after ``\\n``;
  the generation prompt adds ``<think>\\n``;
* qwen2.5 (Qwen2.5-32B-Instruct, InternVL3 / R1V3): the same markers, a default system
  prompt when none is given, and nothing added by the generation prompt;
* r1-distill (DeepSeek-R1-Distill-Qwen-32B, R1V): ``<｜begin▁of▁sentence｜>{s}<｜User｜>{u}``
  ``<｜Assistant｜>``, a reply closed by ``<｜end▁of▁sentence｜>``; the generation prompt adds
  ``<think>\\n``.

:func:`resolve_chat_format` finds a tokenizer's markers by rendering its Jinja
``chat_template`` (transformers' ``apply_chat_template``) on a conversation of sentinel words
and reading the text between them, so any template of this shape works, not only these three.
The markers composed again must reproduce the template's text for a two-turn conversation,
a generation prompt and a prompt without a system turn, and a reply must be closed by one
added token (the rollout's stop token); a template that fails either is named in the error,
and ``data.chat_template`` can name a family instead.

Earlier replies are rendered whole (a template that strips earlier turns' reasoning, as QwQ's
and R1-Distill's do at inference, is followed only for the markers): SFT trains on every reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

AUTO = "auto"
# Marker words written like special tokens: <|im_start|>, <｜User｜>, <｜end▁of▁sentence｜>.
_TOKEN_LIKE = re.compile(r"<[|｜][^<>]*?[|｜]>")
_SENTINELS = ("R1VSENTINELSYSTEM", "R1VSENTINELUSERONE", "R1VSENTINELREPLYONE", "R1VSENTINELUSERTWO",
              "R1VSENTINELREPLYTWO")

# Compact Jinja templates rendering each family's format (the released templates add tool
# calls and strip earlier reasoning; the markers are the same). Tiny tokenizers carry one of
# these, and ``data.chat_template: <family>`` uses it in place of the tokenizer's own.
FAMILY_TEMPLATES = {
    "qwq": ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
            "'<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
            "{{- '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' }}{%- elif m['role'] == 'assistant' %}"
            "{{- '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1].lstrip('\\n') + '<|im_end|>\\n' }}"
            "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}"
            "{%- endif %}"),
    "qwen2.5": ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
                "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
                "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}"
                "{%- if m['role'] == 'user' or m['role'] == 'assistant' %}{{- '<|im_start|>' + m['role'] + '\\n' + "
                "m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
                "{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "r1-distill": ("{{- bos_token }}{%- for m in messages %}{%- if m['role'] == 'system' %}{{- m['content'] }}"
                   "{%- endif %}{%- endfor %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
                   "{{- '<｜User｜>' + m['content'] }}{%- elif m['role'] == 'assistant' %}"
                   "{{- '<｜Assistant｜>' + m['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}"
                   "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}"
                   "{%- endif %}"),
}
CHAT_TEMPLATE_CHOICES = (AUTO, *FAMILY_TEMPLATES)


class ChatFormatError(ValueError):
    """A chat template whose turns cannot be read as markers around the messages."""


@dataclass(frozen=True)
class ChatFormat:
    """The text around the messages of a conversation. A conversation with a system prompt
    is ``system_start + S + system_to_user + U1 + user_to_reply + R1 + reply_end +
    reply_to_user + U2 + user_to_reply + R2 + reply_end``; without one it starts with
    ``start_without_system + U1``; a generation prompt ends with ``user_to_reply + think_prefix``."""

    source: str
    """Where the markers come from (the tokenizer's template, or a named family)."""
    system_start: str
    system_to_user: str
    start_without_system: str
    """A template's default system turn, if it has one, is part of this."""
    user_to_reply: str
    think_prefix: str
    """What the generation prompt adds after the assistant header: ``<think>\\n`` for QwQ and
    R1-Distill (the thought is opened by the prompt), nothing for Qwen2.5."""
    reply_end: str
    """The one added token that closes a reply: trained on, and the rollout's stop token."""
    reply_to_user: str

    @property
    def opens_think(self) -> bool:
        return self.think_prefix.strip() == "<think>"

    def markers(self) -> tuple[str, ...]:
        return (self.system_start, self.system_to_user, self.start_without_system, self.user_to_reply,
                self.think_prefix, self.reply_end, self.reply_to_user)


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")


def _render(tokenizer: Any, template: str, messages: list[dict], generation: bool, source: str) -> str:
    """``template`` rendered as ``tokenizer.apply_chat_template`` renders it: transformers'
    own renderer with the tokenizer's special tokens (``bos_token``, ...) as variables; any
    object with a ``special_tokens_map`` (or none) will do."""
    from transformers.utils.chat_template_utils import render_jinja_template

    special = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    try:
        (text,), _ = render_jinja_template(conversations=[messages], chat_template=template,
                                           add_generation_prompt=generation, **special)
    except Exception as err:  # a Jinja error, or the template's own raise_exception
        raise ChatFormatError(f"{source} does not render a {[m['role'] for m in messages]} conversation: "
                              f"{type(err).__name__}: {err}") from None
    if not isinstance(text, str):
        raise ChatFormatError(f"{source} rendered {type(text).__name__}, not text")
    return text


def _split(text: str, words: tuple[str, ...], source: str) -> list[str]:
    """The text before, between and after ``words``, each of which must occur once, in order."""
    parts, rest = [], text
    for word in words:
        if text.count(word) != 1 or word not in rest:
            raise ChatFormatError(f"{source} does not render each message once and in order (the message "
                                  f"{word!r} in {text!r})")
        before, rest = rest.split(word, 1)
        parts.append(before)
    return parts + [rest]


def added_tokens(tokenizer: Any) -> set[str]:
    """The tokenizer's added tokens (its whole vocabulary for a tokenizer-like object without
    ``get_added_vocab``, e.g. a test double that knows only its special tokens)."""
    getter = getattr(tokenizer, "get_added_vocab", None) or tokenizer.get_vocab
    return set(getter())


def _reply_end(tokenizer: Any, tail: str, source: str) -> str:
    """The added token a reply's closing text starts with (the longest, if several match)."""
    token = max((t for t in added_tokens(tokenizer) if tail.startswith(t)), key=len, default=None)
    if token is None:
        raise ChatFormatError(f"{source} closes a reply with {tail!r}, which does not start with an added token "
                              "(a stop token is needed to end generation)")
    return token


def derive_chat_format(tokenizer: Any, template: str, source: str) -> ChatFormat:
    """The markers of ``template`` (Jinja, rendered with ``tokenizer``'s special tokens); see
    the module docstring."""
    s, u1, r1, u2, r2 = _SENTINELS
    two_turns = [{"role": "system", "content": s}, {"role": "user", "content": u1},
                 {"role": "assistant", "content": r1}, {"role": "user", "content": u2},
                 {"role": "assistant", "content": r2}]
    system_start, system_to_user, user_to_reply, between, second_header, tail = _split(
        _render(tokenizer, template, two_turns, False, source), _SENTINELS, source)
    if second_header != user_to_reply:
        raise ChatFormatError(f"{source} opens the second reply with {second_header!r}, the first with "
                              f"{user_to_reply!r}")
    reply_end = _reply_end(tokenizer, tail, source)
    if not between.startswith(reply_end):
        raise ChatFormatError(f"{source} ends the last reply with {reply_end!r} but an earlier one with {between!r}")
    head = system_start + s + system_to_user + u1 + user_to_reply
    generation = _render(tokenizer, template, two_turns[:2], True, source)
    if not generation.startswith(head):
        raise ChatFormatError(f"{source}: the generation prompt {generation!r} does not start as the conversation "
                              f"does ({head!r})")
    think_prefix = generation[len(head):]
    alone = _render(tokenizer, template, two_turns[1:2], True, source)
    if alone.count(u1) != 1 or not alone.endswith(u1 + user_to_reply + think_prefix):
        raise ChatFormatError(f"{source}: a prompt without a system turn, {alone!r}, does not end with the "
                              "generation prompt's markers")
    found = ChatFormat(source, system_start, system_to_user, alone.split(u1)[0], user_to_reply, think_prefix,
                       reply_end, between[len(reply_end):])
    vocab = tokenizer.get_vocab()
    unknown = sorted({t for m in found.markers() for t in _TOKEN_LIKE.findall(m) if t not in vocab})
    if unknown:  # they would be split into plain text pieces: another family's template
        raise ChatFormatError(f"{source} writes {unknown}, which {_tokenizer_name(tokenizer)} does not have as tokens")
    return found


def resolve_chat_format(tokenizer: Any, choice: str = AUTO) -> ChatFormat:
    """``choice`` ``auto``: the tokenizer's own ``chat_template`` (the qwq family when it has
    none, with a warning); a family name (``FAMILY_TEMPLATES``): that family's markers."""
    name = _tokenizer_name(tokenizer)
    if choice != AUTO:
        if choice not in FAMILY_TEMPLATES:
            raise ChatFormatError(f"chat template {choice!r} is not one of {', '.join(CHAT_TEMPLATE_CHOICES)}")
        return derive_chat_format(tokenizer, FAMILY_TEMPLATES[choice], f"the {choice} chat template")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        import warnings

        warnings.warn(f"{name} has no chat_template: using the qwq family's turn markers "
                      "(set data.chat_template to choose another)", stacklevel=2)
        return derive_chat_format(tokenizer, FAMILY_TEMPLATES["qwq"], f"the qwq chat template (default for {name})")
    source = f"the chat_template of {name}"
    try:
        return derive_chat_format(tokenizer, template, source)
    except ChatFormatError as err:
        raise ChatFormatError(f"{err}; set data.chat_template (--chat-template) to one of "
                              f"{', '.join(FAMILY_TEMPLATES)} to use a family's markers instead") from None


def add_chat_template_arg(parser: Any) -> None:
    """``--chat-template``: ``data.chat_template`` for tools without a config (evaluate,
    rejection sampling, prompt pools), with the same values and default."""
    parser.add_argument("--chat-template", choices=CHAT_TEMPLATE_CHOICES, default=AUTO,
                        help="turn markers, as data.chat_template: auto (the tokenizer's chat_template; default) "
                             f"or a model family ({', '.join(FAMILY_TEMPLATES)})")
