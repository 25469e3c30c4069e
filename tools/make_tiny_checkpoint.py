"""Write a tiny random R1V2-architecture checkpoint in the released (skywork) HF layout,
or a tiny random image-aware reward model.

    python tools/make_tiny_checkpoint.py --out DIR [--preset tiny-r1v-chat] [--seed 0] \
        [--tokenizer TOKENIZER_DIR] [--force] [--reward-model {skywork-vl,r1v}]

The folder looks like a released Skywork-R1V2 checkpoint, only tiny: InternVL-chat
tensor names (``vision_model.``, ``mlp1.``, ``language_model.``) in safetensors with an
index, fp32, the InternVL-chat ``config.json``, and the tokenizer files, so it goes
wherever a real one goes (``tools/convert_checkpoint.py import``, the HF rollout
engine, ``python -m megatron_r1v.evaluate``). Weights are the random initialization of
transformers' ``InternVLForConditionalGeneration`` for the preset, drawn from ``--seed``
(the same seed gives byte-identical safetensors), renamed into the skywork layout with
``layouts.convert_layout``.

Without ``--tokenizer`` the byte-level BPE of ``megatron_r1v.data.tokenizer`` is trained
with the preset's vocabulary size on a synthetic corpus (``data.synthetic``, seed 0,
200 samples). The image token id (``img_context_token_id``) is the tokenizer's
``<IMG_CONTEXT>`` (639 for the trained 640-token BPE), never the preset's; the tokenizer
must fit the preset's vocabulary. The output appears complete or not at all. Prints a
JSON summary.

``--reward-model`` writes a reward model for ``tools/serve_reward_model.py`` instead
(``megatron_r1v/rewards/``), both with ``value_head.safetensors`` holding
``v_head.summary.weight`` [1, hidden_size] and ``v_head.summary.bias`` [1] (random, from
``--seed``; the names of Skywork-VL-Reward-7B's file, see ``rewards/value_head.py``):

* ``r1v``: the checkpoint above (``--preset``, ``--tokenizer`` apply) plus the value head
  over its decoder's hidden size (64 for tiny-r1v-chat);
* ``skywork-vl``: a tiny Qwen2.5-VL in the Skywork-VL-Reward layout (``config.json``,
  ``model.safetensors``, ``preprocessor_config.json``, a byte-level BPE tokenizer with
  Qwen2.5-VL's special tokens and chat template; ``rewards/tiny.py``) plus the value head
  (hidden size 32). ``--preset`` and ``--tokenizer`` do not apply.

Both load in the server offline on CPU in about a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

CORPUS_SAMPLES = 200
CORPUS_SEED = 0


def _tokenizer_into(out: Path, vocab_size: int, tokenizer_dir: Optional[Path]) -> None:
    """Puts tokenizer files into ``out``: copied from ``tokenizer_dir``, or a BPE trained here."""
    from megatron_r1v.checkpoint.hf_io import copy_side_files
    from megatron_r1v.data.synthetic import generate_dataset
    from megatron_r1v.data.tokenizer import corpus_texts, save_hf_tokenizer, train_tokenizer

    if tokenizer_dir is not None:
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"--tokenizer {tokenizer_dir} is not a folder")
        if not copy_side_files(tokenizer_dir, out):
            raise FileNotFoundError(f"--tokenizer {tokenizer_dir} holds no tokenizer files")
        return
    with tempfile.TemporaryDirectory(prefix="tiny-corpus-") as tmp:
        data = Path(tmp) / "data"
        generate_dataset(data, num=CORPUS_SAMPLES, seed=CORPUS_SEED)
        tokenizer = train_tokenizer(corpus_texts([data / "prompts.jsonl", data / "preferences.jsonl"]), vocab_size)
    save_hf_tokenizer(tokenizer, out)


def _with_tokenizer_ids(directory: Path, arch: Any, source: str, preset: str) -> Any:
    """``arch`` with the image token id of the tokenizer in ``directory``, which must load,
    fit the preset's vocabulary and have ``<IMG_CONTEXT>`` (``trainer.arch.with_tokenizer_ids``)."""
    from megatron_r1v.data.tokenizer import load_tokenizer
    from megatron_r1v.trainer.arch import with_tokenizer_ids

    return with_tokenizer_ids(arch, load_tokenizer(directory), source, f"preset {preset!r}")


def random_skywork_tensors(arch: Any, seed: int) -> dict[str, Any]:
    """The random initialization of transformers' InternVL for ``arch`` (from ``seed``), under
    skywork names, fp32. The pixel-shuffle order changes no weight, so a v1 preset gets the
    weights of its v2 twin (transformers has no v1)."""
    import torch

    from megatron_r1v.checkpoint.hf_layouts import convert_layout
    from megatron_r1v.models.r1v.hf_mapping import SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT
    from megatron_r1v.rollout.hf_engine import HFRolloutEngine

    as_v2 = dataclasses.replace(arch, adapter=dataclasses.replace(arch.adapter, ps_version="v2"))
    engine = HFRolloutEngine.from_arch(as_v2, seed=seed, dtype=torch.float32)
    state = dict(engine.named_weights())
    return dict(convert_layout(state.__getitem__, arch, TRANSFORMERS_LAYOUT, SKYWORK_LAYOUT))


def make_tiny_checkpoint(out: str | Path, preset: str = "tiny-r1v-chat", seed: int = 0,
                         tokenizer_dir: str | Path | None = None, force: bool = False,
                         value_head: bool = False) -> dict:
    """Writes the checkpoint (module docstring) to ``out``; returns the summary printed by the CLI.
    ``value_head``: also a random ``value_head.safetensors`` (the ``r1v`` reward model)."""
    from megatron_r1v.atomic_dir import atomic_directory
    from megatron_r1v.checkpoint.hf_io import ShardedSafetensorsWriter
    from megatron_r1v.models.r1v.hf_config import skywork_config
    from megatron_r1v.models.r1v.presets import get_preset

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output {out} exists; pass --force to replace it")
    arch = get_preset(preset)
    if arch.vision is None:
        raise ValueError(f"preset {preset!r} has no vision tower; the skywork layout is an InternVL-chat model")
    with atomic_directory(out) as tmp:
        _tokenizer_into(tmp, arch.decoder.vocab_size, Path(tokenizer_dir) if tokenizer_dir is not None else None)
        source = f"--tokenizer {tokenizer_dir}" if tokenizer_dir else "the trained tokenizer"
        arch = _with_tokenizer_ids(tmp, arch, source, preset)
        tensors = random_skywork_tensors(arch, seed)
        plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
        writer = ShardedSafetensorsWriter(tmp, plan, max_shard_bytes=5 * 10**9)
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        files = writer.finish()
        config = {**skywork_config(arch), "torch_dtype": "float32"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        head = _write_value_head(tmp, arch.decoder.hidden_size, seed) if value_head else None
    summary = {"out": str(out), "preset": preset, "seed": seed, "layout": "skywork", "dtype": "float32",
               "num_tensors": len(tensors), "num_parameters": sum(t.numel() for t in tensors.values()),
               "image_token_id": arch.image_token_id, "vocab_size": arch.decoder.vocab_size,
               "files": [f.name for f in files],
               "tokenizer": str(tokenizer_dir) if tokenizer_dir else f"trained (synthetic corpus, seed {CORPUS_SEED})"}
    return {**summary, "reward_model": "r1v", "value_head": head} if head else summary


def _write_value_head(folder: Path, hidden_size: int, seed: int) -> dict:
    from megatron_r1v.rewards.value_head import describe_value_head, random_value_head, save_value_head

    save_value_head(folder, *random_value_head(hidden_size, seed))
    return describe_value_head(hidden_size)


def make_tiny_reward_model(out: str | Path, kind: str, preset: str = "tiny-r1v-chat", seed: int = 0,
                           tokenizer_dir: str | Path | None = None, force: bool = False) -> dict:
    """A tiny random reward model of ``kind`` (``skywork-vl`` or ``r1v``, module docstring) in ``out``."""
    from megatron_r1v.atomic_dir import atomic_directory
    from megatron_r1v.rewards.tiny import write_tiny_skywork_vl

    if kind == "r1v":
        return make_tiny_checkpoint(out, preset, seed, tokenizer_dir, force, value_head=True)
    if kind != "skywork-vl":
        raise ValueError(f"--reward-model {kind!r} is not one of skywork-vl, r1v")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output {out} exists; pass --force to replace it")
    with atomic_directory(out) as tmp:
        summary = write_tiny_skywork_vl(tmp, seed)
    return {"out": str(out), "seed": seed, "reward_model": "skywork-vl", **summary}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--preset", default="tiny-r1v-chat", help="an R1V preset (default tiny-r1v-chat)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="copy this tokenizer folder instead of training one")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--reward-model", choices=["skywork-vl", "r1v"], default=None,
                        help="write a tiny image-aware reward model of this kind instead (module docstring)")
    args = parser.parse_args(argv)
    try:
        if args.reward_model is not None:
            summary = make_tiny_reward_model(args.out, args.reward_model, args.preset, args.seed, args.tokenizer,
                                             args.force)
        else:
            summary = make_tiny_checkpoint(args.out, args.preset, args.seed, args.tokenizer, args.force)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
