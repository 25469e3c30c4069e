"""HF checkpoint <-> Megatron ``dist_checkpointing`` checkpoint, streaming, with validation.

``import_checkpoint`` runs on every rank of a TP x PP job and joins one collective
``torch_dist`` save of the rank's fragments; each fragment is read from the HF files
(only the rows and columns inside it) when the writer reaches it, so a rank holds a few
fragments, not its shard. ``export_checkpoint`` runs in one process and streams
stored tensors, read piece by piece straight from the checkpoint files, to sharded
safetensors tensor by tensor. Memory of both stays near the largest tensor
(docs/benchmarks.md). Both validate everything they can
before writing, write into a temporary directory and rename it at the end, so a
failure leaves no half-written output.

Layouts: ``skywork`` (the released R1V2 / InternVL-chat checkpoints), ``transformers``
(``InternVLForConditionalGeneration``; files written by its ``save_pretrained`` use hub
names, ``vision_tower.`` etc., and are read and written as such; in-memory
``state_dict()`` names, ``model.vision_tower.``, are read too) and plain Qwen2
(decoder-only). Any layout can be exported to any other that can express the model
(the transformers layout has no ``ps_version`` v1).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_r1v.atomic_dir import check_writable, commit_directory
from megatron_r1v.checkpoint import model_fragments
from megatron_r1v.checkpoint.hf_io import CheckpointError, HFCheckpointReader, ShardedSafetensorsWriter, copy_side_files

# detect_layout stays importable from here (tools use it); the three live in hf_layouts.py,
# which the rollout engine reads checkpoints with, without importing Megatron-Core.
from megatron_r1v.checkpoint.hf_layouts import detect_layout
from megatron_r1v.checkpoint.hf_layouts import expected_hf_shapes as _expected_hf_shapes
from megatron_r1v.checkpoint.hf_layouts import validate_hf as _validate_hf
from megatron_r1v.checkpoint.manifest import verify, write_manifest
from megatron_r1v.checkpoint.torch_dist_io import TorchDistReader
from megatron_r1v.models.r1v.hf_config import (
    arch_from_skywork_config,
    arch_from_transformers_config,
    decoder_arch_to_hf_config,
    skywork_config,
    transformers_internvl_config,
)
from megatron_r1v.models.r1v.hf_mapping import (
    QWEN2_LAYOUT,
    SKYWORK_LAYOUT,
    TRANSFORMERS_FILE_LAYOUT,
    TRANSFORMERS_LAYOUT,
    HFLayout,
    ShardSpec,
    hf_from_stored,
    hf_to_mcore_shard,
    model_tensor_maps,
    stage_tensor_maps,
    stored_box_from_hf,
    stored_shape,
)
from megatron_r1v.models.r1v.presets import AdapterArch, DecoderArch, R1VArch, VisionArch
from megatron_r1v.platform import ParallelContext

META_NAME = "r1v_checkpoint.json"
HF_EXTRA_DIR = "hf_extra"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _names_layout(name: str, tensor_names: Optional[list[str]] = None) -> HFLayout:
    """The naming of a layout on disk (state-dict names when a file uses those)."""
    if name == "qwen2":
        return QWEN2_LAYOUT
    if name == "transformers":
        in_memory = tensor_names is not None and any(n.startswith(TRANSFORMERS_LAYOUT.vision_prefix)
                                                       for n in tensor_names)
        return TRANSFORMERS_LAYOUT if in_memory else TRANSFORMERS_FILE_LAYOUT
    if name == "skywork":
        return SKYWORK_LAYOUT
    raise CheckpointError(f"unknown layout {name!r}")


def _tokenizer_image_token_id(hf_dir: Path) -> Optional[int]:
    """The <IMG_CONTEXT> id of the checkpoint's tokenizer.json (None without one)."""
    tokenizer = hf_dir / "tokenizer.json"
    if tokenizer.exists():
        for token in json.loads(tokenizer.read_text()).get("added_tokens", []):
            if token.get("content") == "<IMG_CONTEXT>":
                return int(token["id"])
    return None


def _image_token_id(hf_dir: Path, config: dict, override: Optional[int]) -> int:
    """IMG_CONTEXT id of a skywork checkpoint: --image-token-id, config, or the tokenizer."""
    if override is not None:
        return override
    if config.get("img_context_token_id") is not None:
        return int(config["img_context_token_id"])
    token_id = _tokenizer_image_token_id(hf_dir)
    if token_id is not None:
        return token_id
    raise CheckpointError(
        f"{hf_dir}: cannot find the <IMG_CONTEXT> token id (not in config.json or tokenizer.json); "
        "pass --image-token-id"
    )


def _arch_of(hf_dir: Path, config: dict, layout_name: str, image_token_id: Optional[int]) -> R1VArch:
    try:
        if layout_name == "skywork":
            arch = arch_from_skywork_config(config, _image_token_id(hf_dir, config, image_token_id))
        else:
            arch = arch_from_transformers_config(config)
    except ValueError as err:
        raise CheckpointError(f"{hf_dir / 'config.json'}: {err}") from None
    # The id recorded in r1v_checkpoint.json is the one training holds the tokenizer to.
    in_tokenizer = _tokenizer_image_token_id(hf_dir)
    if arch.vision is not None and in_tokenizer is not None and in_tokenizer != arch.image_token_id:
        given = "--image-token-id" if image_token_id is not None else str(hf_dir / "config.json")
        raise CheckpointError(f"{hf_dir / 'tokenizer.json'}: <IMG_CONTEXT> has id {in_tokenizer}, but {given} gives "
                              f"{arch.image_token_id}")
    return arch


def _shared_tmp_dir(out: Path, ctx: Optional[ParallelContext]) -> Path:
    token = [uuid.uuid4().hex[:8]]
    if ctx is not None and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return out.parent / f".{out.name}.tmp-{token[0]}"


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise CheckpointError(f"output directory {out} exists; pass --force to replace it")


def import_checkpoint(
    hf_dir: str | Path, out_dir: str | Path, ctx: ParallelContext, *, layout: str = "auto", dtype: str = "bf16",
    force: bool = False, vocab_pad_tp: int = 8, divisible_by: int = 128, image_token_id: Optional[int] = None,
) -> None:
    """Writes this rank's fragments of the HF checkpoint into a torch_dist checkpoint."""
    out = Path(out_dir)
    _check_output(out, force)
    check_writable(out, "--out")  # a read-only or full disk, before any tensor is read
    target = DTYPES[dtype]
    with HFCheckpointReader(hf_dir) as reader:
        config = reader.config()
        layout_name = detect_layout(config, reader.names()) if layout == "auto" else layout
        hf_layout = _names_layout(layout_name, reader.names())
        arch = _arch_of(Path(hf_dir), config, layout_name, image_token_id)
        arch.check_parallel(ctx.tp, ctx.pp, where=str(hf_dir))
        _validate_hf(reader, arch, hf_layout)
        spec = ShardSpec.for_model(arch, ctx.tp, divisible_by, vocab_pad_tp)
        maps = stage_tensor_maps(model_tensor_maps(arch, hf_layout), arch.decoder.num_layers, ctx.pp_rank, ctx.pp,
                                 mcore_prefix="language_model.")
        # Fragments are described from meta tensors (the split rules run, shape checks
        # included, without data); each one's data is read from the HF files only when
        # the checkpoint writer reaches it, so a rank never holds its whole shard.
        local = []
        for tm in maps.values():
            shapes_only = {n: torch.empty(reader.shape(n), dtype=target, device="meta") for n in tm.hf}
            local.append((tm, hf_to_mcore_shard(tm, shapes_only, spec, ctx.tp, ctx.tp_rank)))
        state, _ = model_fragments.sharded_state_dict(local, spec, tp=ctx.tp, tp_rank=ctx.tp_rank,
                                                        dp_rank=ctx.dp_rank)
        by_key = {tm.mcore: tm for tm in maps.values()}

        def produce(st: ShardedTensor) -> torch.Tensor:
            return stored_box_from_hf(by_key[st.key], reader.read, spec, st.global_offset, st.local_shape, target)

        tmp = _shared_tmp_dir(out, ctx)
        try:
            if ctx.rank == 0:
                tmp.mkdir(parents=True)
            dist.barrier()
            model_fragments.save_fragments_streaming(state, produce, str(tmp))
            if ctx.rank == 0:
                meta = model_meta(arch, layout_name, dtype, spec.padded_vocab_size, Path(hf_dir), ctx)
                (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
                (tmp / HF_EXTRA_DIR).mkdir()
                shutil.copy2(Path(hf_dir) / "config.json", tmp / HF_EXTRA_DIR / "config.json")
                copy_side_files(Path(hf_dir), tmp / HF_EXTRA_DIR)
            dist.barrier()
            write_manifest(tmp)  # last, collective (checkpoint/manifest.py)
            if ctx.rank == 0:
                commit_directory(tmp, out)
            dist.barrier()
        finally:
            if ctx.rank == 0 and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def model_meta(arch: R1VArch, layout: str, dtype: str, padded_vocab_size: int, source: Optional[Path],
               ctx: ParallelContext) -> dict:
    """The :data:`META_NAME` record of a model checkpoint: what export needs besides the
    tensors (architecture, HF layout to write, dtype, vocabulary padding) and where it came from."""
    return {"arch": dataclasses.asdict(arch), "layout": layout, "dtype": dtype, "padded_vocab_size": padded_vocab_size,
            "source": str(source.resolve()) if source else None, "saved_with": {"tp": ctx.tp, "pp": ctx.pp}}


def read_meta(mcore_dir: str | Path) -> tuple[R1VArch, dict]:
    path = Path(mcore_dir) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{mcore_dir} is not a megatron-r1v model checkpoint ({META_NAME} missing)") from None
    a = meta["arch"]
    arch = R1VArch(
        DecoderArch(**a["decoder"]), a.get("description", ""),
        vision=VisionArch(**a["vision"]) if a.get("vision") else None,
        adapter=AdapterArch(**a["adapter"]) if a.get("adapter") else None,
        image_token_id=a.get("image_token_id"),
    )
    return arch, meta


def _hf_config(arch: R1VArch, dtype: str, layout_name: str, source_config: Optional[dict]) -> dict:
    import transformers

    if layout_name == "skywork":
        out = skywork_config(arch, source_config if source_config and "llm_config" in source_config else None)
        out["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
        return out
    if arch.vision is None:
        config = transformers.Qwen2Config(**decoder_arch_to_hf_config(arch.decoder))
        config.architectures = ["Qwen2ForCausalLM"]
    else:
        config = transformers.InternVLConfig(**transformers_internvl_config(arch))
        config.architectures = ["InternVLForConditionalGeneration"]
    out = config.to_dict()
    out["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
    return out


def export_checkpoint(
    mcore_dir: str | Path, out_dir: str | Path, *, layout: Optional[str] = None, max_shard_bytes: int = 5 * 10**9,
    force: bool = False, progress: bool = True,
) -> list[Path]:
    """Streams a model checkpoint back to HF safetensors (one process, no process group).

    Stored tensors are read straight from the checkpoint files in pieces no larger than
    the HF tensors they become, and each HF tensor goes to disk before the next is read.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    _check_output(out, force)
    check_writable(out, "--out")  # a read-only or full disk, before anything is read
    arch, meta = read_meta(mcore_dir)
    verify(mcore_dir)  # the files against their manifest, before anything is converted
    layout_name = layout or meta["layout"]
    hf_layout = _names_layout(layout_name)
    if layout_name == "transformers":
        try:
            transformers_internvl_config(arch)
        except ValueError as err:
            raise CheckpointError(f"cannot export {mcore_dir} to the transformers layout: {err}") from None
    spec = dataclasses.replace(ShardSpec.for_model(arch, 1), padded_vocab_size=meta["padded_vocab_size"])
    stored = TorchDistReader(mcore_dir)
    maps = model_tensor_maps(arch, hf_layout)
    expected = _expected_hf_shapes(arch, hf_layout)
    for tm in maps:
        if tm.mcore not in stored:
            raise CheckpointError(f"{mcore_dir}: checkpoint has no tensor {tm.mcore!r}")
        implied = stored_shape(tm, expected, spec)
        if stored.shape(tm.mcore) != implied:
            raise CheckpointError(f"{mcore_dir}: tensor {tm.mcore!r} has shape {stored.shape(tm.mcore)} but "
                                  f"{META_NAME} implies {implied}")
    tmp = _shared_tmp_dir(out, None)
    tmp.mkdir(parents=True)
    try:
        plan = [(name, expected[name], stored.dtype(tm.mcore)) for tm in maps for name in tm.hf]
        writer = ShardedSafetensorsWriter(tmp, plan, max_shard_bytes)
        for tm in tqdm(maps, desc="export", unit="tensor", disable=not progress):
            for name, tensor in hf_from_stored(tm, functools.partial(stored.read, tm.mcore), spec):
                writer.add(name, tensor)
                del tensor  # before the generator reads the next piece: two never coexist
        files = writer.finish()
        extra = Path(mcore_dir) / HF_EXTRA_DIR
        copy_side_files(extra, tmp)
        source_config = json.loads((extra / "config.json").read_text()) if (extra / "config.json").exists() else None
        config = _hf_config(arch, meta["dtype"], layout_name, source_config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        commit_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return [out / f.name for f in files]
