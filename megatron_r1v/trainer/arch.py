"""The architecture a run builds, and the special-token ids it uses.

- :func:`resolve_arch`: with ``model.checkpoint`` set, the architecture the checkpoint
  records in its ``r1v_checkpoint.json`` (``tools/convert_checkpoint.py import`` and every
  training checkpoint write one), whatever its shape; ``model.preset`` is optional then,
  and a preset describing another architecture (any decoder, vision or adapter field) is
  an error naming both and the fields. Without a checkpoint the preset is required: its
  architecture is initialised randomly. Training (``trainer/build.py``, and the HF rollout
  engine it builds from the same architecture), the config checks and the preflight
  (``validation.py``), the memory planner and the recipe check all call it; the preflight
  also compares the SGLang engine's model folder with it (:func:`check_rollout_folder`).
- :func:`with_tokenizer_ids`: ``<IMG_CONTEXT>``'s id is the tokenizer's, never a preset's;
  a checkpoint that records another id is an error naming both files and both ids.
  ``<img>``, ``</img>``, ``<think>`` and the turn markers (``<|im_end|>`` or
  ``<｜end▁of▁sentence｜>``, ... : the tokenizer's ``chat_template``, ``data/chat_format.py``)
  are looked up in the tokenizer by ``data.template.ChatTemplate`` and the stages; nothing
  reads them from a preset.

Reading a checkpoint's record imports ``checkpoint.conversion`` (Megatron-Core), so the
functions import it only when ``model.checkpoint`` is set.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from megatron_r1v.models.r1v.presets import R1VArch, architecture_differences, get_preset

if TYPE_CHECKING:
    from megatron_r1v.config import ModelConfig


def _meta_path(checkpoint: str) -> Path:
    from megatron_r1v.checkpoint.conversion import META_NAME

    return Path(checkpoint) / META_NAME


def has_checkpoint_record(model: "ModelConfig") -> bool:
    """``model.checkpoint`` is set and its architecture record is on this machine."""
    return bool(model.checkpoint) and _meta_path(model.checkpoint).is_file()


def describe(model: "ModelConfig") -> str:
    """Where the architecture of ``model`` comes from here, for messages: the checkpoint, or
    the preset when the checkpoint's record is not on this machine."""
    if model.checkpoint and (model.preset is None or has_checkpoint_record(model)):
        return f"model.checkpoint {model.checkpoint}"
    return f"model.preset {model.preset!r}"


def _preset(model: "ModelConfig") -> Optional[R1VArch]:
    if model.preset is None:
        return None
    try:
        return get_preset(model.preset)
    except KeyError as err:
        raise ValueError(f"model.preset: {err.args[0]}") from None


def _checkpoint_arch(model: "ModelConfig", preset: Optional[R1VArch]) -> R1VArch:
    from megatron_r1v.checkpoint.conversion import read_meta
    from megatron_r1v.checkpoint.hf_io import CheckpointError

    try:
        arch, _ = read_meta(model.checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"model.checkpoint: {err}") from None
    differences = [] if preset is None else architecture_differences(preset, arch)
    if differences:
        raise ValueError(f"model.preset {model.preset!r} and model.checkpoint {model.checkpoint} "
                         f"({_meta_path(model.checkpoint)}) describe different architectures (preset != checkpoint): "
                         f"{'; '.join(differences)}. Leave model.preset unset to build the checkpoint's architecture")
    return arch


def resolve_arch(model: "ModelConfig", *, missing_checkpoint_ok: bool = False) -> R1VArch:
    """The architecture ``model`` builds (module docstring). ``missing_checkpoint_ok``: a
    checkpoint whose record is not on this machine (a plan made away from the cluster)
    falls back to ``model.preset``; the run itself never does."""
    preset = _preset(model)
    if model.checkpoint and (has_checkpoint_record(model) or not missing_checkpoint_ok):
        return _checkpoint_arch(model, preset)
    if preset is not None:
        return preset
    if model.checkpoint:
        raise ValueError(f"model.checkpoint: {_meta_path(model.checkpoint)} is not on this machine and model.preset "
                         "is not set: nothing describes the architecture (set model.preset to plan without it)")
    raise ValueError("model.preset must be set when model.checkpoint is not: a preset describes the architecture to "
                     "initialise randomly (megatron_r1v/models/r1v/presets.py)")


def check_rollout_folder(folder: str, arch: R1VArch, arch_source: str) -> None:
    """The HF folder an SGLang engine builds its model from (``rollout.model_dir``, or the
    checkpoint's ``hf_extra/``) describes ``arch``: weight sync streams ``arch``'s tensors
    into it. Its config.json in the skywork layout is compared; SGLang loads no other."""
    import json

    from megatron_r1v.models.r1v.hf_config import arch_from_skywork_config

    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    if "llm_config" not in config:
        return  # not the skywork layout: the engine refuses it when it starts
    try:
        engine_arch = arch_from_skywork_config(config, image_token_id=0)  # ids are not compared
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    differences = architecture_differences(arch, engine_arch)
    if differences:
        raise ValueError(f"{arch_source} and the SGLang model folder ({config_path}) describe different "
                         f"architectures (run != folder): {'; '.join(differences)}")


def with_tokenizer_ids(arch: R1VArch, tokenizer: Any, tokenizer_source: str, arch_source: str,
                       recorded_in: Optional[Path] = None) -> R1VArch:
    """``arch`` with ``tokenizer``'s ``<IMG_CONTEXT>`` id. ValueError, naming
    ``tokenizer_source`` and ``arch_source``, when the tokenizer has more tokens than the
    vocabulary or lacks the token; ``recorded_in``: the file that recorded ``arch``'s id (a
    checkpoint's), which the tokenizer must then agree with (a preset's id is ignored)."""
    from megatron_r1v.data.tokenizer import IMG_CONTEXT

    if len(tokenizer) > arch.decoder.vocab_size:
        raise ValueError(f"{tokenizer_source} has {len(tokenizer)} tokens, more than the vocabulary of "
                         f"{arch_source} ({arch.decoder.vocab_size})")
    if arch.vision is None:
        return arch
    image_id = tokenizer.get_vocab().get(IMG_CONTEXT)
    if image_id is None:
        raise ValueError(f"{tokenizer_source} has no {IMG_CONTEXT} token: an R1V model takes its image token id "
                         "from the tokenizer")
    if recorded_in is not None and arch.image_token_id is not None and arch.image_token_id != image_id:
        raise ValueError(f"{tokenizer_source}: {IMG_CONTEXT} has id {image_id}, but {recorded_in} records "
                         f"image_token_id {arch.image_token_id}; use the tokenizer the checkpoint was made with "
                         "(an imported checkpoint keeps a copy in its hf_extra/ folder)")
    return dataclasses.replace(arch, image_token_id=int(image_id))


def run_arch(model: "ModelConfig", tokenizer: Any, tokenizer_source: str) -> R1VArch:
    """:func:`resolve_arch` with the token ids of ``tokenizer`` (:func:`with_tokenizer_ids`);
    ``model.checkpoint``'s recorded id must agree with the tokenizer's."""
    recorded_in = _meta_path(model.checkpoint) if model.checkpoint else None
    return with_tokenizer_ids(resolve_arch(model), tokenizer, tokenizer_source, describe(model), recorded_in)
