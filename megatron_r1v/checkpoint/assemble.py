"""Assembling an R1V start model from its public parts (Eq. 1: f_v, f_c, f_l).

    python tools/assemble_checkpoint.py --vision InternViT-6B-448px-V2_5 --llm QwQ-32B --out r1v2-start

Inputs, local folders in their public formats:

* ``--vision``: the standalone InternViT release (``InternVisionModel``: config.json and
  ``embeddings.*`` / ``encoder.layers.N.*`` safetensors), or an InternVL-chat checkpoint,
  whose ``vision_model.*`` is taken;
* ``--llm``: a ``Qwen2ForCausalLM`` folder (config.json, safetensors, possibly sharded,
  tokenizer files), or an InternVL-chat checkpoint, whose ``language_model.*`` is taken;
* ``--adapter-from``: an InternVL-chat / R1V checkpoint whose ``mlp1.*`` is copied
  (transformers' ``multi_modal_projector.*`` names are read too); without it a fresh,
  seeded adapter (:func:`_random_adapter`).

The output is an R1V checkpoint in the released skywork / InternVL-chat layout, the one
``tools/convert_checkpoint.py import`` reads: tensor names from
:mod:`megatron_r1v.models.r1v.hf_mapping` (``SKYWORK_LAYOUT``), config.json from
:func:`megatron_r1v.models.r1v.hf_config.skywork_config` overlaid with the parts' own
config keys, and the LLM's tokenizer extended with InternVL's tokens
(:data:`INTERNVL_TOKENS`). It is validated against what import expects before it is
committed. Tensors are copied one at a time (plain file reads; each on disk before the
next is read), so memory stays near the largest tensor (the vocabulary: 1.6 GB for a
32B Qwen2 in bf16); the folder appears complete or not at all. Every bad input raises
:class:`CheckpointError` naming the flag, the file and the tensor or key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatron_r1v.atomic_dir import atomic_directory, check_writable
from megatron_r1v.checkpoint.hf_io import CheckpointError, HFCheckpointReader, ShardedSafetensorsWriter
from megatron_r1v.checkpoint.hf_layouts import detect_layout, expected_hf_shapes, validate_hf
from megatron_r1v.data.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, TOKENIZER_FILES, load_tokenizer
from megatron_r1v.models.r1v.hf_config import arch_from_skywork_config, decoder_arch_from_hf_config, skywork_config
from megatron_r1v.models.r1v.hf_mapping import (
    INTERNVL_CHAT,
    QWEN2_CAUSAL_LM,
    SKYWORK_LAYOUT,
    TRANSFORMERS_FILE_LAYOUT,
    TRANSFORMERS_LAYOUT,
    TensorMap,
    adapter_tensor_maps,
    decoder_tensor_maps,
    vision_tensor_maps,
)
from megatron_r1v.models.r1v.presets import R1VArch

INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
"""InternVL's tokens, in the order its training code adds them to an LLM's tokenizer."""

# The standalone release's InternVisionModel is the module InternVL-chat holds as
# vision_model: the same tensor names without that prefix.
STANDALONE_VISION_LAYOUT = dataclasses.replace(SKYWORK_LAYOUT, vision_prefix="")
ADAPTER_SOURCE_LAYOUTS = (SKYWORK_LAYOUT, TRANSFORMERS_FILE_LAYOUT, TRANSFORMERS_LAYOUT)
QWEN2_ARCHITECTURE = "Qwen2ForCausalLM"
MEAN_CHUNK_ROWS = 1024
"""Rows per step of the mean over the vocabulary (a float64 copy of this many rows at most)."""


@dataclass(frozen=True)
class AssemblyOptions:
    """What ``tools/assemble_checkpoint.py`` was asked to do."""

    vision: Path
    """Standalone InternViT folder, or an InternVL-chat checkpoint (its ``vision_model.*``)."""
    llm: Path
    """Qwen2ForCausalLM folder with its tokenizer, or an InternVL-chat checkpoint (its ``language_model.*``)."""
    out: Path
    adapter_from: Optional[Path] = None
    """InternVL-chat / R1V checkpoint whose ``mlp1`` is copied; None: a fresh adapter drawn from ``seed``."""
    downsample_ratio: Optional[float] = None
    """Pixel-shuffle ratio; None: the ``adapter_from`` config's, else 0.5."""
    ps_version: Optional[str] = None
    """Pixel-shuffle token order (v1/v2); None: the ``adapter_from`` config's, else v2."""
    seed: int = 0
    """Seed of the fresh adapter."""
    force: bool = False
    """Replace an existing output folder."""
    max_shard_bytes: int = 5 * 10**9
    progress: bool = True
    """Progress lines and a progress bar on stderr."""


@dataclass(frozen=True)
class AssemblyReport:
    """What was written (printed as JSON by the tool)."""

    out: str
    adapter: str
    """``random (seed S)`` or the ``--adapter-from`` folder."""
    image_token_id: int
    added_tokens: dict[str, int]
    """Tokens appended to the LLM's tokenizer, with their ids (ones it had are not re-added)."""
    source_vocab_rows: int
    vocab_rows: int
    resized: bool
    """Whether the embedding and output layer got rows (only when new ids exceed the LLM's rows)."""
    num_tensors: int
    total_bytes: int
    files: list[str]


@dataclass(frozen=True)
class _Part:
    """One input folder: its tensors, its part's config, and whether it is a whole InternVL-chat model."""

    flag: str
    directory: Path
    reader: HFCheckpointReader
    config: dict
    """The part's own config (``vision_config`` / ``llm_config`` of an InternVL-chat checkpoint)."""
    full_config: dict
    combined: bool


@dataclass(frozen=True)
class _Vocab:
    """The tokenizer extension and what it does to the embedding and output-layer rows."""

    old_len: int
    """Tokens before the extension: the rows whose mean initialises the new ones."""
    added: dict[str, int]
    image_token_id: int
    source_rows: int
    rows: int


@dataclass(frozen=True)
class _Tensor:
    """One output tensor: its name and header, and how to produce its data when the writer reaches it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


def assemble_checkpoint(opts: AssemblyOptions) -> AssemblyReport:
    """Writes the R1V checkpoint of ``opts`` (module docstring); validates everything before writing."""
    log = functools.partial(print, file=sys.stderr, flush=True) if opts.progress else (lambda *_: None)
    _check_output(opts)
    vision = _open_part("--vision", opts.vision, _vision_config)
    llm = _open_part("--llm", opts.llm, _llm_config)
    source = _open_part("--adapter-from", opts.adapter_from, _chat_config) if opts.adapter_from else None
    tokenizer, vocab = _extend_tokenizer(llm, _source_decoder_rows(llm))
    log(f"tokenizer: {len(vocab.added)} InternVL tokens added {vocab.added}; <IMG_CONTEXT> = {vocab.image_token_id}; "
        f"vocabulary rows {vocab.source_rows} -> {vocab.rows}")
    arch = _arch(vision, llm, source, opts, vocab)
    expected = expected_hf_shapes(arch, SKYWORK_LAYOUT)
    llm_tensors = _llm_tensors(llm, arch, expected, vocab)
    adapter = _adapter_tensors(source, arch, expected, opts.seed, llm_tensors[0].dtype)
    tensors = _vision_tensors(vision, arch, expected) + adapter + llm_tensors
    config = _output_config(arch, vision, llm, source, vocab, llm_tensors[0].dtype)
    adapter_text = str(source.directory) if source else f"random (seed {opts.seed})"
    total = sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors)
    log(f"writing {len(tensors)} tensors ({total / 1e9:.2f} GB) to {opts.out}; adapter: {adapter_text}")
    with atomic_directory(opts.out) as tmp:
        files = _write_tensors(tmp, tensors, opts)
        tokenizer.save_pretrained(str(tmp))
        _write_side_files(tmp, config, llm, _remote_code_source(config["architectures"], source, vision, llm))
        (tmp / "assembly.json").write_text(json.dumps(_provenance(opts, vocab, adapter_text), indent=2) + "\n")
        _validate_output(tmp, arch, config)
    return AssemblyReport(str(opts.out), adapter_text, vocab.image_token_id, vocab.added, vocab.source_rows,
                          vocab.rows, vocab.rows > vocab.source_rows, len(tensors), total, [f.name for f in files])


# --- inputs -----------------------------------------------------------------------------

def _check_output(opts: AssemblyOptions) -> None:
    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise CheckpointError(f"output directory {out} exists; pass --force to replace it")
    resolved = out.resolve()
    for flag, folder in (("--vision", opts.vision), ("--llm", opts.llm), ("--adapter-from", opts.adapter_from)):
        # --force replaces the output folder: it must not be (or hold) an input.
        if folder is not None and (resolved == Path(folder).resolve() or resolved in Path(folder).resolve().parents):
            raise CheckpointError(f"--out {out} would replace {flag} {folder}; write the assembled model elsewhere")
    check_writable(out, "--out")  # a read-only or full disk, before anything is read


def _open_part(flag: str, directory: Path, classify: Callable[[str, Path, dict], tuple[dict, bool]]) -> _Part:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{flag} {directory} is not a folder")
    config_path = directory / "config.json"
    try:
        full = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{flag} {config_path} is missing") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{flag} {config_path} is not valid JSON: {err}") from None
    config, combined = classify(flag, config_path, full)
    try:
        reader = HFCheckpointReader(directory)
    except CheckpointError as err:
        raise CheckpointError(f"{flag}: {err}") from None
    return _Part(flag, directory, reader, config, full, combined)


def _is_chat(cfg: dict) -> bool:
    return "vision_config" in cfg and "llm_config" in cfg


def _vision_config(flag: str, path: Path, cfg: dict) -> tuple[dict, bool]:
    archs = cfg.get("architectures") or []
    if "InternVisionModel" in archs or (not archs and cfg.get("model_type") == "intern_vit_6b"):
        return cfg, False
    if _is_chat(cfg):
        return cfg["vision_config"], True
    raise CheckpointError(f"{flag} {path}: architectures {archs} (model_type {cfg.get('model_type')!r}) is neither "
                          "a standalone InternViT (InternVisionModel) nor an InternVL-chat checkpoint")


def _llm_config(flag: str, path: Path, cfg: dict) -> tuple[dict, bool]:
    combined = _is_chat(cfg)
    llm = cfg["llm_config"] if combined else cfg
    archs = llm.get("architectures") or []
    if archs != [QWEN2_ARCHITECTURE] and not (not archs and llm.get("model_type") == "qwen2"):
        where = f"{path} (llm_config)" if combined else str(path)
        raise CheckpointError(f"{flag} {where}: architectures {archs} (model_type {llm.get('model_type')!r}) is not "
                              f"a Qwen2-family LLM ({QWEN2_ARCHITECTURE}: QwQ-32B, DeepSeek-R1-Distill-Qwen-32B, "
                              "Qwen2.5-32B-Instruct)")
    return llm, combined


def _chat_config(flag: str, path: Path, cfg: dict) -> tuple[dict, bool]:
    return cfg, True  # only its adapter tensors (checked by name and shape) and pixel-shuffle keys are used


def _source_decoder_rows(llm: _Part) -> int:
    """Vocabulary rows of the LLM (its config; the tensors are checked against it later)."""
    try:
        decoder = decoder_arch_from_hf_config(llm.config)
    except ValueError as err:
        raise CheckpointError(f"--llm {llm.directory / 'config.json'}: {err}") from None
    if not decoder.untie_embeddings:
        raise CheckpointError(f"--llm {llm.directory / 'config.json'}: tie_word_embeddings=true is not supported "
                              "(the 32B Qwen2 decoders of R1V have an untied lm_head)")
    return decoder.vocab_size


def _extend_tokenizer(llm: _Part, source_rows: int) -> tuple[Any, _Vocab]:
    """The LLM's tokenizer with the InternVL tokens it lacks appended (as special tokens,
    so decoding with skip_special_tokens drops them), and the rows that gives."""
    if not any((llm.directory / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"--llm {llm.directory} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = load_tokenizer(llm.directory)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"--llm {llm.directory}: its tokenizer does not load: {err}") from None
    old_len = len(tokenizer)
    if old_len > source_rows:
        raise CheckpointError(f"--llm {llm.directory}: the tokenizer has {old_len} tokens but config.json's "
                              f"vocab_size is {source_rows}")
    present = tokenizer.get_vocab()
    missing = [token for token in INTERNVL_TOKENS if token not in present]
    tokenizer.add_tokens(missing, special_tokens=True)
    added = {token: int(tokenizer.convert_tokens_to_ids(token)) for token in missing}
    if sorted(added.values()) != list(range(old_len, len(tokenizer))):  # the rows below assume contiguous ids
        raise CheckpointError(f"--llm {llm.directory}: the tokenizer gave the new tokens the ids {added}, not "
                              f"{old_len}.. after its {old_len} tokens (its ids are not contiguous)")
    # Qwen2 checkpoints carry padding rows past the tokenizer (152064 rows for ~151.7k
    # tokens): new ids that fit take those rows; only ids past them grow the vocabulary,
    # to exactly len(tokenizer), as InternVL's resize_token_embeddings(len(tokenizer)).
    rows = max(source_rows, len(tokenizer))
    image_token_id = int(tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    return tokenizer, _Vocab(old_len, added, image_token_id, source_rows, rows)


def _resolve(flag: str, given: Any, source: Optional[_Part], key: str, default: Any) -> Any:
    """A pixel-shuffle setting: the flag's, else the --adapter-from config's, else the default.
    A flag that contradicts the config its mlp1 was trained with is an error."""
    from_source = None if source is None else source.full_config.get(key)
    if key == "ps_version" and source is not None and from_source is None and "llm_config" in source.full_config:
        from_source = "v1"  # InternVLChatConfig's default when the key is absent
    if given is None:
        return from_source if from_source is not None else default
    if from_source is not None and given != from_source:
        raise CheckpointError(f"{flag} {given} differs from {key}={from_source!r} in "
                              f"{source.directory / 'config.json'}, which --adapter-from's mlp1 was trained with")
    return given


def _check_ratio(ratio: float) -> int:
    """1/ratio, which must be an integer (the pixel shuffle folds n x n patches into one token)."""
    inverse = round(1 / ratio) if 0 < ratio <= 1 else 0
    if not inverse or abs(inverse * ratio - 1) > 1e-9:
        raise CheckpointError(f"--downsample-ratio {ratio:g}: must be 1/n for an integer n "
                              "(0.5 folds 2 x 2 patches into one visual token)")
    return inverse


def _arch(vision: _Part, llm: _Part, source: Optional[_Part], opts: AssemblyOptions, vocab: _Vocab) -> R1VArch:
    ratio = float(_resolve("--downsample-ratio", opts.downsample_ratio, source, "downsample_ratio", 0.5))
    ps_version = _resolve("--ps-version", opts.ps_version, source, "ps_version", "v2")
    inverse = _check_ratio(ratio)
    if ps_version not in ("v1", "v2"):
        raise CheckpointError(f"--ps-version {ps_version!r}: must be v1 or v2 (InternVL's pixel-shuffle token orders)")
    chat = vision.full_config if vision.combined else {}
    combined = {
        "vision_config": vision.config, "llm_config": {**llm.config, "vocab_size": vocab.rows},
        "downsample_ratio": ratio, "ps_version": ps_version, "select_layer": chat.get("select_layer", -1),
        "force_image_size": chat.get("force_image_size") or vision.config.get("image_size"),
    }
    try:
        arch = arch_from_skywork_config(combined, vocab.image_token_id)
        arch.vision.check()
    except ValueError as err:  # the LLM's config was read already: what is left is the vision's
        raise CheckpointError(f"--vision {vision.directory / 'config.json'}: {err}") from None
    side = arch.vision.patches_per_side
    if side % inverse:
        raise CheckpointError(f"--downsample-ratio {ratio:g}: 1/{ratio:g} = {inverse} does not divide the {side} "
                              f"patches per side of the vision encoder's {arch.vision.image_size}px tiles")
    return arch


# --- tensors ----------------------------------------------------------------------------

def _name_pairs(src_maps: list[TensorMap], dst_maps: list[TensorMap]) -> list[tuple[str, str]]:
    """(source name, output name) of the same tensors in two layouts."""
    pairs = []
    for src, dst in zip(src_maps, dst_maps, strict=True):
        assert src.mcore == dst.mcore and len(src.hf) == len(dst.hf), (src, dst)
        pairs += zip(src.hf, dst.hf)
    return pairs


def _check_part(part: _Part, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Every tensor of the part is there with its shape and a float dtype; a standalone
    folder holds nothing else. The first problem, in model order, is named."""
    present = set(part.reader.names())
    missing = [name for name in shapes if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{part.flag} {part.directory}: missing tensor {missing[0]!r}{more}")
    unexpected = [] if part.combined else sorted(present - set(shapes))
    if unexpected:
        raise CheckpointError(f"{part.flag} {part.directory}: unexpected tensor {unexpected[0]!r} (not part of {what})")
    for name, want in shapes.items():
        got = part.reader.shape(name)
        if got != want:
            raise CheckpointError(f"{part.flag} {part.reader.file_of[name]}: tensor {name!r} has shape {got} but "
                                  f"config.json implies {want}")
        if not part.reader.dtype(name).is_floating_point:
            raise CheckpointError(f"{part.flag} {part.reader.file_of[name]}: tensor {name!r} has dtype "
                                  f"{part.reader.dtype(name)}, not a floating-point weight")


def _copy(part: _Part, src: str, dst: str, shape: tuple[int, ...]) -> _Tensor:
    return _Tensor(dst, shape, part.reader.dtype(src), functools.partial(part.reader.read, src))


def _vision_tensors(vision: _Part, arch: R1VArch, expected: dict) -> list[_Tensor]:
    layout = SKYWORK_LAYOUT if vision.combined else STANDALONE_VISION_LAYOUT
    pairs = _name_pairs(vision_tensor_maps(arch.vision, layout), vision_tensor_maps(arch.vision, SKYWORK_LAYOUT))
    shapes = {src: expected[dst] for src, dst in pairs}
    _check_part(vision, shapes, "an InternViT of this config")
    return [_copy(vision, src, dst, shapes[src]) for src, dst in pairs]


def _llm_tensors(llm: _Part, arch: R1VArch, expected: dict, vocab: _Vocab) -> list[_Tensor]:
    """The decoder's tensors, embedding first; the two vocabulary tables get the new tokens' rows."""
    src_maps = decoder_tensor_maps(arch.decoder, INTERNVL_CHAT if llm.combined else QWEN2_CAUSAL_LM)
    pairs = _name_pairs(src_maps, decoder_tensor_maps(arch.decoder, INTERNVL_CHAT))
    tables = {tm.hf[0] for tm in src_maps if tm.kind == "vocab"}
    shapes = {src: (vocab.source_rows, *expected[dst][1:]) if src in tables else expected[dst] for src, dst in pairs}
    _check_part(llm, shapes, "a Qwen2 decoder of this config")
    tensors = []
    for src, dst in pairs:
        if src in tables:
            make = functools.partial(_vocab_table, llm.reader, src, vocab)
            tensors.append(_Tensor(dst, expected[dst], llm.reader.dtype(src), make))
        else:
            tensors.append(_copy(llm, src, dst, shapes[src]))
    return tensors


def _vocab_table(reader: HFCheckpointReader, name: str, vocab: _Vocab) -> torch.Tensor:
    """``embed_tokens`` or ``lm_head`` with the new tokens' rows set to the mean of the
    old tokens' rows; every other row as the LLM has it (padding rows included).

    Why the mean: a new token's embedding then sits at the centre of the ones the LLM
    was trained on instead of at a random or zero point it never saw, and its output
    row gives it the average logit, so the extended model's next-token distribution
    starts almost where the LLM's was (InternVL initialises new output rows the same
    way). Padding rows are left out of the mean: they were never a token's row.
    """
    hidden = reader.shape(name)[1:]
    table_VH = torch.empty((vocab.rows, *hidden), dtype=reader.dtype(name))
    reader.read(name, (slice(0, vocab.source_rows),), table_VH[: vocab.source_rows])  # straight into place
    assert set(range(vocab.source_rows, vocab.rows)) <= set(vocab.added.values()), "rows past the LLM's are new"
    if vocab.added:
        mean_H = _row_mean(table_VH[: vocab.old_len])
        table_VH[torch.tensor(sorted(vocab.added.values()))] = mean_H.to(table_VH.dtype)
    return table_VH


def _row_mean(rows_VH: torch.Tensor) -> torch.Tensor:
    """Mean over rows, accumulated in float64 a chunk at a time (no float copy of the table)."""
    total_H = torch.zeros(rows_VH.shape[1:], dtype=torch.float64)
    for start in range(0, rows_VH.shape[0], MEAN_CHUNK_ROWS):
        total_H += rows_VH[start:start + MEAN_CHUNK_ROWS].to(torch.float64).sum(0)
    return total_H / rows_VH.shape[0]


def _adapter_tensors(source: Optional[_Part], arch: R1VArch, expected: dict, seed: int,
                     dtype: torch.dtype) -> list[_Tensor]:
    dst_maps = adapter_tensor_maps(SKYWORK_LAYOUT)
    if source is None:
        return _random_adapter(dst_maps, arch, expected, seed, dtype)
    present = set(source.reader.names())
    layout = next((layout for layout in ADAPTER_SOURCE_LAYOUTS
                   if all(n in present for tm in adapter_tensor_maps(layout) for n in tm.hf)), None)
    if layout is None:
        names = ", ".join(n for tm in dst_maps for n in tm.hf)
        raise CheckpointError(f"--adapter-from {source.directory}: no adapter tensors ({names}) in this checkpoint")
    pairs = _name_pairs(adapter_tensor_maps(layout), dst_maps)
    for src, dst in pairs:
        got = source.reader.shape(src)
        if got != expected[dst]:
            v, ratio = arch.vision.hidden_size, arch.adapter.downsample_ratio
            raise CheckpointError(
                f"--adapter-from {source.reader.file_of[src]}: tensor {src!r} has shape {got}, but this model's "
                f"adapter maps vision hidden {v} x (1/{ratio:g})^2 = {arch.adapter_input_size} -> LLM hidden "
                f"{arch.decoder.hidden_size}, which needs {expected[dst]}")
    return [_copy(source, src, dst, expected[dst]) for src, dst in pairs]


def _random_adapter(maps: list[TensorMap], arch: R1VArch, expected: dict, seed: int,
                    dtype: torch.dtype) -> list[_Tensor]:
    """A fresh mlp1 initialised as InternVL initialises one: it builds
    ``Sequential(LayerNorm, Linear, GELU, Linear)`` with PyTorch's default init, so its
    MLP warm-up starts from LayerNorm weight 1 / bias 0 (a plain normalisation at first)
    and Linear weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``kaiming_uniform_``
    with a=sqrt(5)), which keeps every output unit's variance near a third of its input's.
    Recipes tuned on InternVL's warm-up start from the same distribution. Drawn in float32
    from one generator seeded with ``seed``, in model order, then cast to the LLM's dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    fan_in = {"linear_fc1": arch.adapter_input_size, "linear_fc2": arch.decoder.hidden_size}
    tensors = []
    for tm in maps:
        (name,) = tm.hf
        shape = expected[name]
        if ".layer_norm." in tm.mcore:
            make = functools.partial(torch.full, shape, 1.0 if tm.mcore.endswith("weight") else 0.0, dtype=dtype)
        else:
            layer = next(key for key in fan_in if f".{key}." in tm.mcore)
            make = functools.partial(_uniform, shape, fan_in[layer], gen, dtype)
        tensors.append(_Tensor(name, shape, dtype, make))
    return tensors


def _uniform(shape: tuple[int, ...], fan_in: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen).to(dtype)


# --- output -----------------------------------------------------------------------------

_SOURCE_ONLY_KEYS = ("_name_or_path", "auto_map")
"""Config keys that describe the source folder (its path, its remote code), not the model."""


def _own(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _SOURCE_ONLY_KEYS}


def _remote_code_source(architectures: list[str], *parts: Optional[_Part]) -> Optional[_Part]:
    """The first InternVL-chat input with remote code (``auto_map``) for the output's own
    architecture: with its ``*.py`` files the output loads with ``trust_remote_code`` as
    that checkpoint does. Code of another class (e.g. Skywork-R1V's SkyworkR1VChatModel)
    is not mixed with this config."""
    return next((p for p in parts if p is not None and _is_chat(p.full_config) and "auto_map" in p.full_config
                 and p.full_config.get("architectures") == architectures), None)


def _output_config(arch: R1VArch, vision: _Part, llm: _Part, source: Optional[_Part], vocab: _Vocab,
                   dtype: torch.dtype) -> dict:
    """The InternVL-chat config.json: the project's keys for ``arch``, the parts' own keys
    on top (what a released checkpoint carries: bos/eos ids, sliding window, ...), the
    chat keys this project does not model (template, dynamic tiling) from an InternVL-chat
    input when there is one."""
    chats = [p.full_config for p in (source, vision, llm) if p is not None and _is_chat(p.full_config)]
    config = skywork_config(arch, chats[0] if chats else None)
    config["vision_config"] = {**config["vision_config"], **_own(vision.config)}
    config["llm_config"] = {**config["llm_config"], **_own(llm.config), "vocab_size": vocab.rows}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    code = _remote_code_source(config["architectures"], source, vision, llm)
    if code is not None:
        config["auto_map"] = code.full_config["auto_map"]
    assert arch_from_skywork_config(config, vocab.image_token_id) == arch, "import must read back this architecture"
    return config


def _write_tensors(tmp: Path, tensors: list[_Tensor], opts: AssemblyOptions) -> list[Path]:
    from tqdm import tqdm

    writer = ShardedSafetensorsWriter(tmp, [(t.name, t.shape, t.dtype) for t in tensors], opts.max_shard_bytes)
    with tqdm(total=writer.total_bytes, desc="assemble", unit="B", unit_scale=True, disable=not opts.progress) as bar:
        for item in tensors:
            tensor = item.produce()
            writer.add(item.name, tensor)
            bar.update(tensor.numel() * tensor.element_size())
            del tensor  # before the next one is read: two never coexist
    return writer.finish()


def _write_side_files(tmp: Path, config: dict, llm: _Part, code: Optional[_Part]) -> None:
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = llm.directory / "generation_config.json"
    if generation.is_file():  # the LLM's sampling defaults and stop ids
        shutil.copy2(generation, tmp / generation.name)
    if code is not None:
        for path in sorted(code.directory.glob("*.py")):
            shutil.copy2(path, tmp / path.name)


def _provenance(opts: AssemblyOptions, vocab: _Vocab, adapter: str) -> dict:
    return {
        "vision": str(Path(opts.vision).resolve()), "llm": str(Path(opts.llm).resolve()), "adapter": adapter,
        "adapter_init": None if opts.adapter_from else "LayerNorm 1/0; Linear U(-1/sqrt(fan_in), 1/sqrt(fan_in))",
        "added_tokens": vocab.added, "image_token_id": vocab.image_token_id,
        "new_rows": f"mean of embed_tokens / lm_head rows [0, {vocab.old_len})",
        "vocab_rows": {"source": vocab.source_rows, "output": vocab.rows},
    }


def _validate_output(tmp: Path, arch: R1VArch, config: dict) -> None:
    """What import will check, checked before the folder is committed (invariants: a
    failure here is a bug of this module, not of the input)."""
    with HFCheckpointReader(tmp) as reader:
        assert detect_layout(config, reader.names()) == "skywork"
        validate_hf(reader, arch, SKYWORK_LAYOUT)
    assert load_tokenizer(tmp).convert_tokens_to_ids(IMG_CONTEXT) == config["img_context_token_id"]
