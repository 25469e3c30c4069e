"""A small byte-level BPE tokenizer for tiny models, in Hugging Face format.

The real R1V2 tokenizer (QwQ's, ~152k tokens plus InternVL's image tokens) cannot be
downloaded here and would dwarf a tiny model's embedding, so tests and the quickstart
train one with the ``tokenizers`` library on the synthetic corpus. It has QwQ / R1V2's
special tokens, and they sit at fixed ids at the top of the vocabulary in the order of
``SPECIAL_TOKENS``: ``<IMG_CONTEXT>`` is always ``vocab_size - 1``, so a preset can name
its image token id without reading the tokenizer.

    python -m megatron_r1v.data.tokenizer --corpus DIR/prompts.jsonl DIR/preferences.jsonl \
        --vocab-size 1024 --out DIR/tokenizer
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
# Order fixes the ids: the last one gets vocab_size - 1.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END, IMG_START, IMG_END, IMG_CONTEXT)
# Text fields of the prompt / preference schemas that make up the corpus.
CORPUS_FIELDS = ("question", "answer", "choices", "prompt", "chosen", "rejected")
TEMPLATE_WORDS = "system user assistant You are a helpful assistant. Think step by step. The answer is \\boxed{}."


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """The fixed id of each special token in a tokenizer built with ``vocab_size``."""
    first = vocab_size - len(SPECIAL_TOKENS)
    return {token: first + i for i, token in enumerate(SPECIAL_TOKENS)}


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


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with exactly ``vocab_size`` tokens, the special ones last.

    A corpus too small for ``vocab_size - len(SPECIAL_TOKENS)`` BPE tokens is filled up
    with ``<|reserved_N|>`` tokens, so the special ids never move.
    """
    n_regular = vocab_size - len(SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_regular < len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                         f"{len(alphabet) + len(SPECIAL_TOKENS)} tokens (256 bytes + {len(SPECIAL_TOKENS)} special)")
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
                          for t in filler + list(SPECIAL_TOKENS)])
    ids = special_token_ids(vocab_size)
    got = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    assert got == ids and tokenizer.get_vocab_size() == vocab_size, (got, ids, tokenizer.get_vocab_size())
    return tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int = 32768) -> None:
    """Writes tokenizer.json + tokenizer_config.json + special_tokens_map.json (AutoTokenizer loads it)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
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


def build_tokenizer(corpus_files: list[Path], vocab_size: int, out_dir: Path, force: bool = False) -> dict:
    """Trains and saves; the output folder appears complete or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    for path in corpus_files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
    tokenizer = train_tokenizer(corpus_texts(corpus_files), vocab_size)
    with atomic_directory(out_dir) as tmp:
        save_hf_tokenizer(tokenizer, tmp)
    return {"out": str(out_dir), "vocab_size": vocab_size, **special_token_ids(vocab_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", required=True, type=Path, help="prompts / preferences JSONL files")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    try:
        summary = build_tokenizer(args.corpus, args.vocab_size, args.out, args.force)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
