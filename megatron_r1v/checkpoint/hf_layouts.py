"""HF checkpoint layouts without Megatron: detection, validation and in-memory conversion.

Everything here works on HF-named tensors only (names come from
:mod:`megatron_r1v.models.r1v.hf_mapping`), so the rollout engine, evaluation and the
tiny-checkpoint tool can read and convert checkpoints without importing Megatron-Core.
:mod:`megatron_r1v.checkpoint.conversion` uses the same detection and validation for
its imports.

:func:`convert_layout` rewrites a whole model from one HF layout to another (e.g. the
released skywork names into transformers' in-memory ``state_dict`` names) one tensor map
at a time, through the TP-independent stored form that dist checkpoints keep: the same
two functions, ``hf_mapping.hf_to_stored`` and ``hf_mapping.stored_to_hf``, that
checkpoint import and export go through, so an in-memory conversion equals an import
followed by an export, bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch

from megatron_r1v.checkpoint.hf_io import CheckpointError, HFCheckpointReader
from megatron_r1v.models.r1v.hf_config import decoder_arch_to_hf_config, transformers_internvl_config
from megatron_r1v.models.r1v.hf_mapping import (
    QWEN2_LAYOUT,
    SKYWORK_LAYOUT,
    TRANSFORMERS_FILE_LAYOUT,
    TRANSFORMERS_LAYOUT,
    HFLayout,
    ShardSpec,
    hf_to_stored,
    model_tensor_maps,
    stored_to_hf,
)
from megatron_r1v.models.r1v.presets import R1VArch

TensorReader = Callable[[str], torch.Tensor]
"""HF name -> the whole tensor (``HFCheckpointReader.read``, ``state_dict.__getitem__``)."""


def detect_layout(config: dict, names: list[str]) -> str:
    """``skywork``, ``transformers`` or ``qwen2`` from config.json and tensor names."""
    if config.get("model_type") == "qwen2" or config.get("architectures") == ["Qwen2ForCausalLM"]:
        return "qwen2"
    transformers_prefixes = (TRANSFORMERS_FILE_LAYOUT.vision_prefix, TRANSFORMERS_LAYOUT.vision_prefix)
    if any(n.startswith(transformers_prefixes) for n in names):
        return "transformers"
    if any(n.startswith(SKYWORK_LAYOUT.vision_prefix) for n in names) or "llm_config" in config:
        return "skywork"
    raise CheckpointError("cannot tell the checkpoint layout from config.json and tensor names")


def expected_hf_shapes(arch: R1VArch, layout: HFLayout) -> dict[str, tuple[int, ...]]:
    """Shapes transformers itself gives each tensor for this config (built on the meta
    device), under the names of ``layout`` (a fused [Q; K; V] stacks the three)."""
    import transformers

    with torch.device("meta"):
        if arch.vision is None:
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**decoder_arch_to_hf_config(arch.decoder)))
        else:
            # The token order (ps_version) and the image token id (unset in a 38B preset) change no shape.
            as_v2 = dataclasses.replace(arch, adapter=dataclasses.replace(arch.adapter, ps_version="v2"),
                                        image_token_id=arch.image_token_id or 0)
            model = transformers.InternVLForConditionalGeneration(
                transformers.InternVLConfig(**transformers_internvl_config(as_v2))
            )
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    reference = QWEN2_LAYOUT if arch.vision is None else TRANSFORMERS_LAYOUT
    expected = {}
    for ref_tm, tm in zip(model_tensor_maps(arch, reference), model_tensor_maps(arch, layout)):
        parts = [shapes[n] for n in ref_tm.hf]
        if len(tm.hf) == len(parts):
            expected.update(zip(tm.hf, parts))
        else:  # one fused tensor
            expected[tm.hf[0]] = (sum(p[0] for p in parts), *parts[0][1:])
    return expected


def validate_hf(reader: HFCheckpointReader, arch: R1VArch, layout: HFLayout) -> None:
    """Every tensor of ``arch`` in ``layout`` is present with its shape, and nothing else is;
    a CheckpointError names the first tensor (and its file) that is not."""
    expected = expected_hf_shapes(arch, layout)
    mapped = {n for tm in model_tensor_maps(arch, layout) for n in tm.hf}
    present = set(reader.names())
    missing = sorted(mapped - present)
    if missing:
        raise CheckpointError(f"{reader.directory}: missing tensor {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(present - mapped)
    if unexpected:
        raise CheckpointError(f"{reader.directory}: unexpected tensor {unexpected[0]!r} (not part of the model)" +
                              (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name in sorted(mapped):
        got = reader.shape(name)
        if got != expected[name]:
            raise CheckpointError(
                f"{reader.file_of[name]}: tensor {name!r} has shape {got} but config.json implies {expected[name]}"
            )


def convert_layout(
    read: TensorReader, arch: R1VArch, src: HFLayout, dst: HFLayout
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a model in layout ``src`` (fetched by name with ``read``), renamed and
    reshaped into layout ``dst``; yields ``(dst name, tensor)`` in model order.

    One tensor map at a time: its ``src`` tensors are read, turned into the stored form
    and split into its ``dst`` tensors, so besides what the caller keeps, memory holds
    one map's tensors. Values and dtypes are unchanged (conversion only moves rows).
    Yielded tensors are contiguous; they may share storage with each other. Raises
    ValueError when ``dst`` cannot express ``arch`` (the transformers layouts have no
    pixel-shuffle v1) and KeyError naming a tensor ``read`` does not have.
    """
    if dst.style == "transformers" and dst.vision_prefix and arch.vision is not None:
        # Raises for ps_version v1; the image token id moves no tensor.
        transformers_internvl_config(dataclasses.replace(arch, image_token_id=arch.image_token_id or 0))
    # No vocabulary padding: the stored form would otherwise hold padding rows that the
    # way out only slices off again (a transient copy of the embedding for nothing).
    spec = dataclasses.replace(ShardSpec.for_model(arch, 1), padded_vocab_size=arch.decoder.vocab_size)
    for src_tm, dst_tm in zip(model_tensor_maps(arch, src), model_tensor_maps(arch, dst), strict=True):
        assert src_tm.mcore == dst_tm.mcore and src_tm.kind == dst_tm.kind, (src_tm, dst_tm)
        parts = {}
        for name in src_tm.hf:
            try:
                parts[name] = read(name)
            except KeyError:
                raise KeyError(f"the source checkpoint has no tensor {name!r} (part of {src_tm.mcore})") from None
        stored = hf_to_stored(src_tm, parts, spec)
        del parts
        for name, tensor in stored_to_hf(dst_tm, stored, spec).items():
            yield name, tensor.contiguous()
