"""Tiny pretrained parts of an R1V model, in their public formats: what ``tools/make_tiny_parts.py`` writes.

An R1V model is assembled from a pretrained InternViT and a pretrained reasoning LLM joined by
a fresh MLP adapter (``tools/assemble_checkpoint.py``). No pretrained tiny parts exist, and
random ones give the later stages nothing to build on: the quickstart's supervised stage
cannot both learn to see and to speak in a few minutes. So each part gets a short warm-up
here, on the training split of a ``perception`` synthetic set (``data.synthetic``):

* **vision** (``InternViT-tiny/``, a standalone InternViT release: ``InternVisionModel``
  config.json and model.safetensors under its public names). The tower is transformers'
  InternVL vision tower; each 56-px tile of an image is a training example, and for each
  28-px cell of the tile (the four patches the adapter's pixel shuffle turns into one visual
  token) a linear probe on the cell's four patch features names what the metadata says is
  there: nothing, or one of the palette's colours in one of the three shapes. The probe is
  thrown away, as a CLIP-style pretraining's text tower would be; what remains is a tower
  whose tokens hold colour and shape.
* **language** (``Qwen2-tiny/``, a ``Qwen2ForCausalLM`` folder from ``save_pretrained`` with
  a byte-level BPE tokenizer of the chat family, without InternVL's image tokens, as Qwen2's
  own tokenizers are). The decoder is trained as a language model on the set's texts as
  plain documents: each question (its ``<image>`` marker dropped) followed by its reference
  reply. It learns the words and the answer format, not the chat markers and not the images.

Both are deterministic for a seed. The data is read and checked before any training, and
each folder appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from megatron_r1v.atomic_dir import atomic_directory
from megatron_r1v.data.synthetic import PALETTE, SHAPES, read_jsonl
from megatron_r1v.data.synthetic_perception import CELL
from megatron_r1v.models.r1v.presets import R1VArch, get_preset

VISION_DIR, LLM_DIR = "InternViT-tiny", "Qwen2-tiny"
NUM_CELL_CLASSES = 1 + len(PALETTE) * len(SHAPES)


@dataclass(frozen=True)
class PartsOptions:
    """What ``make_tiny_parts`` builds (``tools/make_tiny_parts.py``'s flags)."""

    data: Path
    """A ``perception`` synthetic set: prompts.jsonl, preferences.jsonl, sft.jsonl, metadata.jsonl, images/."""
    out: Path
    preset: str = "tiny-r1v-chat"
    """The widths of the parts (the preset's vision tower and decoder)."""
    vision_steps: int = 300
    llm_steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    chat_family: str = "qwq"
    force: bool = False

    def validate(self) -> None:
        for name in ("vision_steps", "llm_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr}")
        for name in ("prompts.jsonl", "preferences.jsonl", "sft.jsonl", "metadata.jsonl"):
            if not (self.data / name).is_file():
                raise FileNotFoundError(f"{self.data / name} is missing: --data must be a synthetic set "
                                        "(python -m megatron_r1v.data.synthetic --family perception)")
        for name in (VISION_DIR, LLM_DIR):
            if (self.out / name).exists() and not self.force:
                raise FileExistsError(f"{self.out / name} exists; pass --force to replace it")


def cell_class(obj: dict) -> int:
    """The probe's class of a shape: 1 + colour * len(SHAPES) + shape (0 is an empty cell)."""
    return 1 + list(PALETTE).index(obj["color"]) * len(SHAPES) + SHAPES.index(obj["shape"])


def tile_examples(data: Path, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``tile``-px grid tile of every image of ``data``, as the training loaders tile it
    (``data.tiling.tile_file``: InternVL's tiling and normalisation, no thumbnail; [N, 3, tile,
    tile]), and the class of each of its 28-px cells ([N, tile/28, tile/28]), from metadata.jsonl."""
    from megatron_r1v.data.tiling import TilingConfig, tile_file

    if tile % CELL:
        raise ValueError(f"the vision tower's tiles ({tile} px) are not whole 28-px cells")
    per_side = tile // CELL
    pixels, labels = [], []
    for line_no, meta in enumerate(read_jsonl(data / "metadata.jsonl"), 1):
        where = f"{data / 'metadata.jsonl'}:{line_no} ({meta.get('id')})"
        cols, rows = meta["width"] // tile, meta["height"] // tile
        if (cols * tile, rows * tile) != (meta["width"], meta["height"]):
            raise ValueError(f"{where}: a {meta['width']}x{meta['height']} image is not whole {tile}-px tiles; "
                             "the vision warm-up needs the perception family (--family perception)")
        grid = np.zeros((rows * per_side, cols * per_side), dtype=np.int64)
        for obj in meta["objects"]:
            if "shape" not in obj:
                raise ValueError(f"{where}: an object without a shape; the vision warm-up needs the perception family")
            grid[obj["box"][1] // CELL, obj["box"][0] // CELL] = cell_class(obj)
        tiled = tile_file(data / "images" / f"{meta['id']}.png",
                          TilingConfig(image_size=tile, max_tiles=cols * rows, use_thumbnail=False))
        if tiled.grid != (cols, rows):  # the tiler would resize this image: its cells would not be tokens
            raise ValueError(f"{where}: the tiler cuts a {cols}x{rows}-tile image into {tiled.grid}")
        pixels.append(tiled.pixel_values)
        labels += [torch.from_numpy(grid[ty * per_side:(ty + 1) * per_side, tx * per_side:(tx + 1) * per_side])
                   for ty in range(rows) for tx in range(cols)]
    return torch.cat(pixels), torch.stack(labels)


def cell_features(hidden_BPD: torch.Tensor, patches_per_side: int, per_cell: int) -> torch.Tensor:
    """Patch features [B, 1 + P*P, D] (class token first) -> one vector per cell [B, C, C, per_cell^2 * D]."""
    b, _, d = hidden_BPD.shape
    grid = hidden_BPD[:, 1:].reshape(b, patches_per_side, patches_per_side, d)
    cells = patches_per_side // per_cell
    grid = grid.reshape(b, cells, per_cell, cells, per_cell, d).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, cells, cells, per_cell * per_cell * d)


def _schedule(step: int, steps: int, warmup: int = 20) -> float:
    """Linear warm-up, then cosine to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(params: list, steps: int, lr: float, batch_loss: Callable[[int], tuple[torch.Tensor, dict]],
           name: str, log: Callable[[str], None]) -> list[dict]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps))
    history, start = [], time.perf_counter()
    for step in range(steps):
        loss, extra = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step == 0 or (step + 1) % 50 == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": round(loss.item(), 4), **extra})
            shown = " | ".join(f"{k} {v:.3f}" for k, v in extra.items())
            log(f"{name} step {step + 1}/{steps} | loss {loss.item():.4f}{' | ' + shown if shown else ''} | "
                f"{time.perf_counter() - start:.1f}s")
    return history


def pretrain_vision(arch: R1VArch, tiles: tuple[torch.Tensor, torch.Tensor], opts: PartsOptions,
                    log: Callable[[str], None]):
    """transformers' InternVL with ``arch``'s widths (random from ``opts.seed``), its vision tower
    trained on the cell probe over ``tiles`` (``tile_examples``; module docstring); returns
    (the model, the history)."""
    from megatron_r1v.rollout.hf_engine import HFRolloutEngine

    vision = arch.vision
    pixels, labels = tiles
    per_cell = CELL // vision.patch_size
    log(f"vision warm-up: {len(pixels)} tiles of {vision.image_size} px, "
        f"{int((labels > 0).sum())} shapes in {labels.numel()} cells")
    engine = HFRolloutEngine.from_arch(arch, seed=opts.seed, dtype=torch.float32)
    tower = engine.model.model.vision_tower.train()
    gen = torch.Generator().manual_seed(opts.seed)
    probe = torch.nn.Linear(per_cell * per_cell * vision.hidden_size, NUM_CELL_CLASSES)
    with torch.no_grad():
        probe.weight.normal_(0.0, 0.02, generator=gen)
        probe.bias.zero_()

    def batch_loss(step: int) -> tuple[torch.Tensor, dict]:
        pick = torch.randint(len(pixels), (opts.batch_size,), generator=gen)
        hidden = tower(pixel_values=pixels[pick]).last_hidden_state
        logits = probe(cell_features(hidden, vision.patches_per_side, per_cell))
        target = labels[pick]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, NUM_CELL_CLASSES), target.reshape(-1))
        hit = logits.argmax(-1) == target
        # Most cells are empty: the accuracy on the cells holding a shape is the informative one.
        return loss, {"cell_accuracy": hit.float().mean().item(),
                      "shape_accuracy": hit[target > 0].float().mean().item()}

    history = _train(list(tower.parameters()) + list(probe.parameters()), opts.vision_steps, opts.lr,
                     batch_loss, "vision", log)
    return engine.model.eval(), history


def lm_documents(data: Path) -> list[str]:
    """The set's conversations as plain documents: each user turn (``<image>`` dropped), a
    newline, and the reply."""
    from megatron_r1v.data.schema import IMAGE_PLACEHOLDER

    docs = []
    for record in read_jsonl(data / "sft.jsonl"):
        turns = record["messages"]
        docs.append("\n".join(turn["content"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
                              for turn in turns))
    return docs


def pretrain_language(arch: R1VArch, tokenizer, docs: list[str], opts: PartsOptions, log: Callable[[str], None]):
    """A ``Qwen2ForCausalLM`` with ``arch.decoder``'s widths and one row per token of
    ``tokenizer``, trained on ``docs``, each ended by the tokenizer's pad token; returns
    (the model, the history)."""
    import transformers

    from megatron_r1v.models.r1v.hf_config import decoder_arch_to_hf_config

    end = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(doc, add_special_tokens=False)["input_ids"] + [end] for doc in docs]
    log(f"language warm-up: {len(encoded)} documents, {sum(map(len, encoded))} tokens, "
        f"vocabulary {len(tokenizer)}")
    config = transformers.Qwen2Config(**decoder_arch_to_hf_config(
        dataclasses.replace(arch.decoder, vocab_size=len(tokenizer))))
    config.architectures = ["Qwen2ForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed + 1)
        model = transformers.Qwen2ForCausalLM(config).float().train()
    gen = torch.Generator().manual_seed(opts.seed + 1)

    def batch_loss(step: int) -> tuple[torch.Tensor, dict]:
        pick = torch.randint(len(encoded), (opts.batch_size,), generator=gen).tolist()
        length = max(len(encoded[i]) for i in pick)
        ids = torch.full((len(pick), length), end, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(pick):
            ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, :len(encoded[i])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss, {}

    history = _train(list(model.parameters()), opts.llm_steps, opts.lr, batch_loss, "language", log)
    return model.eval(), history


def make_tiny_parts(opts: PartsOptions, log: Callable[[str], None] = print) -> dict:
    """Writes ``opts.out/InternViT-tiny`` and ``opts.out/Qwen2-tiny`` (module docstring);
    returns a summary with each warm-up's loss history."""
    from safetensors.torch import save_file

    from megatron_r1v.checkpoint.hf_layouts import convert_layout
    from megatron_r1v.data.tokenizer import (
        corpus_texts,
        load_tokenizer,
        save_hf_tokenizer,
        train_tokenizer,
        without_image_tokens,
    )
    from megatron_r1v.models.r1v.hf_config import skywork_config
    from megatron_r1v.models.r1v.hf_mapping import SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT

    opts.validate()
    arch = get_preset(opts.preset)
    if arch.vision is None:
        raise ValueError(f"preset {opts.preset!r} has no vision tower")
    torch.manual_seed(opts.seed)
    tiles = tile_examples(opts.data, arch.vision.image_size)  # checks the images and metadata before any training
    docs = lm_documents(opts.data)
    with atomic_directory(opts.out / LLM_DIR) as llm_tmp:
        texts = corpus_texts([opts.data / "prompts.jsonl", opts.data / "preferences.jsonl"])
        bpe = without_image_tokens(train_tokenizer(texts, arch.decoder.vocab_size, opts.chat_family))
        save_hf_tokenizer(bpe, llm_tmp, family=opts.chat_family)
        tokenizer = load_tokenizer(llm_tmp)
        llm, llm_history = pretrain_language(arch, tokenizer, docs, opts, log)
        llm.save_pretrained(llm_tmp, safe_serialization=True)
        (llm_tmp / "pretraining.json").write_text(json.dumps({"history": llm_history}, indent=2) + "\n")
    model, vision_history = pretrain_vision(arch, tiles, opts, log)
    state = {name: p.detach() for name, p in model.state_dict().items()}
    prefix = SKYWORK_LAYOUT.vision_prefix
    tensors = {name[len(prefix):]: t.contiguous() for name, t in
               convert_layout(state.__getitem__, arch, TRANSFORMERS_LAYOUT, SKYWORK_LAYOUT) if name.startswith(prefix)}
    with atomic_directory(opts.out / VISION_DIR) as vision_tmp:
        save_file(tensors, str(vision_tmp / "model.safetensors"), metadata={"format": "pt"})
        config = {**skywork_config(arch)["vision_config"], "torch_dtype": "float32"}
        (vision_tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (vision_tmp / "pretraining.json").write_text(json.dumps({"history": vision_history}, indent=2) + "\n")
    return {"out": str(opts.out), "vision": str(opts.out / VISION_DIR), "llm": str(opts.out / LLM_DIR),
            "vision_tensors": len(tensors), "tokenizer_tokens": len(tokenizer),
            "vision_final": vision_history[-1], "language_final": llm_history[-1]}
