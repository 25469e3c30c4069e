"""A small byte-level BPE tokenizer for tiny models, in Hugging Face format.

The real R1V2 tokenizer (QwQ's, ~152k tokens plus InternVL's image tokens) cannot be
downloaded here and would dwarf a tiny model's embedding, so tests and the quickstart
train one with the ``tokenizers`` library on the synthetic corpus. It has the special
tokens of a model family (``--chat-family``: ``qwq``, R1V2's, the default; ``r1-distill``,
R1V's DeepSeek-R1-Distill-Qwen markers; ``qwen2.5``, chatml without an opened thought)
at fixed ids at the top of the vocabulary in the order of ``FAMILY_TOKENS[family]``
(``<IMG_CONTEXT>`` is always ``vocab_size - 1``), and that family's ``chat_template``
(``data.chat_format.FAMILY_TEMPLATES``), as a released tokenizer has its own.

    python -m megatron_r1v.data.tokenizer --corpus DIR/prompts.jsonl DIR/preferences.jsonl \\
        --vocab-size 1024 --out DIR/tokenizer [--chat-family r1-distill]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_r1v.atomic_dir import atomic_directory

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK_START, THINK_END = "<think>", "</think>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# DeepSeek-R1-Distill-Qwen's markers (it renamed Qwen's <|endoftext|>, <|im_start|>, <|im_end|> ids).
R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_USER, R1_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# Order fixes the ids: the last one gets vocab_size - 1.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END, IMG_START, IMG_END, IMG_CONTEXT)
FAMILY_TOKENS = {
    "qwq": SPECIAL_TOKENS,
    "qwen2.5": SPECIAL_TOKENS,
    "r1-distill": (R1_EOS, R1_USER, R1_ASSISTANT, R1_BOS, THINK_START, THINK_END, IMG_START, IMG_END, IMG_CONTEXT),
}
# (bos, eos, pad) of each family's tokenizer.
_FAMILY_ROLES = {"qwq": (None, IM_END, ENDOFTEXT), "qwen2.5": (None, IM_END, ENDOFTEXT),
                 "r1-distill": (R1_BOS, R1_EOS, R1_EOS)}
# Text fields of the prompt / preference schemas that make up the corpus.
CORPUS_FIELDS = ("question", "answer", "choices", "prompt", "chosen", "rejected")
TEMPLATE_WORDS = "system user assistant You are a helpful assistant. Think step by step. The answer is \\boxed{}."


def _family_tokens(family: str) -> tuple[str, ...]:
    if family not in FAMILY_TOKENS:
        raise ValueError(f"chat family {family!r} is not one of {', '.join(FAMILY_TOKENS)}")
    return FAMILY_TOKENS[family]


def special_token_ids(vocab_size: int, family: str = "qwq") -> dict[str, int]:
    """The fixed id of each special token in a ``family`` tokenizer built with ``vocab_size``."""
    tokens = _family_tokens(family)
    first = vocab_size - len(tokens)
    return {token: first + i for i, token in enumerate(tokens)}


def corpus_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Every text field of JSONL records (prompts, preferences, SFT conversations), plus the template's words."""
    yield TEMPLATE_WORDS
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not JSON: {err}") from None
                for field in CORPUS_FIELDS:
                    value = record.get(field) if isinstance(record, dict) else None
                    if isinstance(value, str):
                        yield value
                    elif isinstance(value, list):
                        yield " ".join(str(v) for v in value)
                messages = record.get("messages") if isinstance(record, dict) else None
                for message in messages if isinstance(messages, list) else ():  # SFT conversations
                    if isinstance(message, dict) and isinstance(message.get("content"), str):
                        yield message["content"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, family: str = "qwq") -> Tokenizer:
    """Byte-level BPE with exactly ``vocab_size`` tokens, the family's special ones last.

    A corpus too small for ``vocab_size - len(FAMILY_TOKENS[family])`` BPE tokens is filled
    up with ``<|reserved_N|>`` tokens, so the special ids never move.
    """
    special = _family_tokens(family)
    n_regular = vocab_size - len(special)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_regular < len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                         f"{len(alphabet) + len(special)} tokens (256 bytes + {len(special)} special)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_regular, initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    filler = [f"<|reserved_{i}|>" for i in range(n_regular - tokenizer.get_vocab_size())]
    # As in QwQ's tokenizer, the think tags are added but not special: decoding with
    # skip_special_tokens keeps them, and the format reward needs to see them.
    tokenizer.add_tokens([AddedToken(t, special=t not in (THINK_START, THINK_END), normalized=False)
                          for t in filler + list(special)])
    ids = special_token_ids(vocab_size, family)
    got = {token: tokenizer.token_to_id(token) for token in special}
    assert got == ids and tokenizer.get_vocab_size() == vocab_size, (got, ids, tokenizer.get_vocab_size())
    return tokenizer


def without_image_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` without InternVL's <img>, </img> and <IMG_CONTEXT> (the last ids of
    ``train_tokenizer``'s vocabulary), as a Qwen2 LLM's own tokenizer has none: what
    ``tools/assemble_checkpoint.py`` extends."""
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in (IMG_START, IMG_END, IMG_CONTEXT)]
    return Tokenizer.from_str(json.dumps(spec))


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int = 32768,
                      family: str = "qwq") -> None:
    """Writes tokenizer.json + tokenizer_config.json (with the family's ``chat_template``) +
    special_tokens_map.json (AutoTokenizer loads it)."""
    from transformers import PreTrainedTokenizerFast

    from .chat_format import FAMILY_TEMPLATES

    _family_tokens(family)
    bos, eos, pad = _FAMILY_ROLES[family]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=None,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    hf.chat_template = FAMILY_TEMPLATES[family]
    hf.save_pretrained(str(out_dir))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Any one of these makes a folder a tokenizer folder for AutoTokenizer."""


def load_tokenizer(directory: "str | Path"):
    """``AutoTokenizer.from_pretrained(directory)`` for tokenizer folders and checkpoint folders.

    AutoTokenizer also reads a checkpoint folder's config.json, and warns about model types
    it does not know (the released R1V2's ``internvl_chat``); the tokenizer class comes
    from tokenizer_config.json, so such a config is not passed on.
    """
    from transformers import AutoTokenizer, PretrainedConfig

    folder = Path(directory)
    if not folder.is_dir():  # a local path only: never a Hugging Face Hub name
        raise FileNotFoundError(f"tokenizer folder {directory} does not exist")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{directory} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                "point --tokenizer / data.tokenizer at the folder that has one")
    config = folder / "config.json"
    unknown = False
    if config.is_file():
        try:
            unknown = json.loads(config.read_text()).get("model_type") == "internvl_chat"
        except (json.JSONDecodeError, AttributeError):
            unknown = False
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                         **({"config": PretrainedConfig()} if unknown else {}))


def check_tokenizer_fits(tokenizer, vocab_size: int, image_token_id: Optional[int], source: str, model: str,
                         *, require_image_token: bool = True) -> None:
    """Raises ValueError unless ``tokenizer``'s ids fit a model: ``<IMG_CONTEXT>`` at the
    model's image token id (``require_image_token=False``: or absent) and no more tokens
    than its vocabulary. ``source`` and ``model`` name the two in the message."""
    image_id = tokenizer.get_vocab().get(IMG_CONTEXT)
    if image_token_id is not None and image_id != image_token_id and (require_image_token or image_id is not None):
        raise ValueError(f"{source}: {IMG_CONTEXT} has id {image_id}, but {model}'s image token id is {image_token_id}")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{source} has {len(tokenizer)} tokens, more than {model}'s vocabulary of {vocab_size}")


def build_tokenizer(corpus_files: list[Path], vocab_size: int, out_dir: Path, force: bool = False,
                    family: str = "qwq") -> dict:
    """Trains and saves; the output folder appears complete or not at all."""
    _family_tokens(family)
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    for path in corpus_files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
    tokenizer = train_tokenizer(corpus_texts(corpus_files), vocab_size, family)
    with atomic_directory(out_dir) as tmp:
        save_hf_tokenizer(tokenizer, tmp, family=family)
    return {"out": str(out_dir), "vocab_size": vocab_size, "chat_family": family,
            **special_token_ids(vocab_size, family)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", required=True, type=Path, help="prompts / preferences JSONL files")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--chat-family", default="qwq", choices=sorted(FAMILY_TOKENS),
                        help="special tokens and chat_template of this model family (default qwq: R1V2's)")
    args = parser.parse_args()
    try:
        summary = build_tokenizer(args.corpus, args.vocab_size, args.out, args.force, args.chat_family)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
