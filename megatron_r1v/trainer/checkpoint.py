"""Training checkpoints of the MPO and GRPO stages: everything a resumed run needs to
continue exactly as an uninterrupted one would.

    <save_dir>/step_000003/
        model/           Megatron dist checkpoint (torch_dist), TP/PP-independent fragments,
                         with r1v_checkpoint.json: ``tools/convert_checkpoint.py export``
                         turns it into an HF checkpoint, and ``model.checkpoint`` of the next
                         stage can start from it
        ssb/             GRPO: the Selective Sample Buffer (zarr, one group per DP rank)
        rank_00000.pt    per rank: optimizer state, the trainer's own state (GRPO: the
                         reference weights; MPO: BCO's running reward mean), torch RNG states
        trainer.json     stage, step, data cursor, parallel layout
    <save_dir>/latest    the name of the newest complete checkpoint

A trainer provides ``rank_state()`` / ``load_rank_state(state)`` and
``save_files(dir, step)`` / ``load_files(dir)`` (collective) for what only it has.

A checkpoint is written into ``.step_000003.partial`` and committed by rank 0 after every
rank has finished (``atomic_dir``), then ``latest`` is replaced atomically; a save killed
halfway leaves the previous checkpoint and ``latest`` untouched. The model and the SSB reload at any
TP/PP/DP; the optimizer state is per rank (``torch.save`` of Megatron's optimizer state
dict), so resuming needs the same parallel layout, which :func:`load_checkpoint` checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_r1v.atomic_dir import commit_directory, partial_directory, partial_path, write_text_atomic
from megatron_r1v.checkpoint.model_fragments import load_model_checkpoint, save_model_checkpoint

LATEST = "latest"


def _layout(ctx) -> dict:
    return {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "world_size": ctx.world_size}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _write_model_meta(model_dir: Path, trainer) -> None:
    """What export needs besides the tensors: the HF layout and config of the checkpoint the
    run started from (or the skywork layout for random weights)."""
    from megatron_r1v.checkpoint.conversion import HF_EXTRA_DIR, META_NAME, model_meta

    cfg, stage = trainer.cfg, trainer.stage
    source = Path(cfg.model.checkpoint) if cfg.model.checkpoint else None
    layout = "skywork"
    if source is not None and (source / META_NAME).is_file():
        layout = json.loads((source / META_NAME).read_text())["layout"]
        if (source / HF_EXTRA_DIR).is_dir():
            shutil.copytree(source / HF_EXTRA_DIR, model_dir / HF_EXTRA_DIR)
    meta = model_meta(stage.arch, layout, cfg.model.params_dtype, stage.shard_spec.padded_vocab_size, source,
                      trainer.ctx)
    (model_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def save_checkpoint(save_dir: str | Path, step: int, trainer, ctx) -> Path:
    """Writes the state after ``step`` steps (collective over all ranks); returns the folder."""
    save_dir = Path(save_dir)
    name = f"step_{step:06d}"
    final, partial = save_dir / name, partial_path(save_dir / name)
    if ctx.rank == 0:
        partial_directory(final)  # fresh: a killed save may have left one
        (partial / "model").mkdir()
    dist.barrier()
    stage = trainer.stage
    save_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx, str(partial / "model"))
    trainer.save_files(partial, step)
    torch.save({"optimizer": trainer.optimizer.state_dict(), "trainer": trainer.rank_state(),
                "rng": _rng_state()}, partial / f"rank_{ctx.rank:05d}.pt")
    if ctx.rank == 0:
        _write_model_meta(partial / "model", trainer)
        meta = {"stage": trainer.cfg.train.stage, "step": step, "data": trainer.loader.state_dict(),
                "layout": _layout(ctx)}
        write_text_atomic(partial / "trainer.json", json.dumps(meta, indent=1))
    dist.barrier()
    if ctx.rank == 0:
        # A checkpoint of the same step being replaced is deleted only once the new one
        # is in place, and `latest` names it only after that.
        commit_directory(partial, final)
        write_text_atomic(save_dir / LATEST, name + "\n")
    dist.barrier()
    return final


def latest_checkpoint(save_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under ``save_dir``, or None."""
    marker = Path(save_dir) / LATEST
    if not marker.is_file():
        return None
    path = Path(save_dir) / marker.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{marker} names {path}, which is not a complete checkpoint (no trainer.json)")
    return path


def load_checkpoint(path: str | Path, trainer, ctx) -> int:
    """Restores ``trainer`` from ``path``; returns the number of steps already done."""
    path = Path(path)
    meta = json.loads((path / "trainer.json").read_text())
    if meta.get("stage", "grpo") != trainer.cfg.train.stage:
        raise ValueError(f"{path} is a {meta.get('stage', 'grpo')} checkpoint; this run is train.stage="
                         f"{trainer.cfg.train.stage} (start a new stage from it with model.checkpoint={path}/model)")
    if meta["layout"] != _layout(ctx):
        raise ValueError(f"{path} was saved with parallel layout {meta['layout']}, this run is {_layout(ctx)}: "
                         "the optimizer state is per rank, resume with the same tp/pp/dp")
    stage = trainer.stage
    load_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx, str(path / "model"))
    per_rank = torch.load(path / f"rank_{ctx.rank:05d}.pt", weights_only=False)
    trainer.optimizer.load_state_dict(per_rank["optimizer"])
    trainer.load_rank_state(per_rank["trainer"])
    trainer.load_files(path)
    trainer.loader.load_state_dict(meta["data"])
    torch.set_rng_state(per_rank["rng"]["torch"])
    if per_rank["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(per_rank["rng"]["cuda"])
    return int(meta["step"])
