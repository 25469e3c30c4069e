"""Training checkpoints of the GRPO stage: everything a resumed run needs to continue
exactly as an uninterrupted one would.

    <save_dir>/step_000003/
        model/           Megatron dist checkpoint (torch_dist), TP/PP-independent fragments
        ssb/             the Selective Sample Buffer (zarr, one group per DP rank)
        rank_00000.pt    per rank: optimizer state, the reference (initial trainable) weights,
                         torch RNG states
        trainer.json     step, data cursor, parallel layout
    <save_dir>/latest    the name of the newest complete checkpoint

A checkpoint is written into ``.step_000003.partial`` and renamed by rank 0 after every
rank has finished, then ``latest`` is replaced atomically; a save killed halfway leaves
the previous checkpoint and ``latest`` untouched. The model and the SSB reload at any
TP/PP/DP; the optimizer state is per rank (``torch.save`` of Megatron's optimizer state
dict), so resuming needs the same parallel layout, which :func:`load_checkpoint` checks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_r1v.models.r1v.checkpoint_layout import load_model_checkpoint, save_model_checkpoint
from megatron_r1v.ssb import load as load_ssb
from megatron_r1v.ssb import save as save_ssb

LATEST = "latest"


def _layout(ctx) -> dict:
    return {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "world_size": ctx.world_size}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(save_dir: str | Path, step: int, trainer, ctx) -> Path:
    """Writes the state after ``step`` steps (collective over all ranks); returns the folder."""
    save_dir = Path(save_dir)
    name = f"step_{step:06d}"
    final, partial = save_dir / name, save_dir / f".{name}.partial"
    if ctx.rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)  # left by a killed save
        (partial / "model").mkdir(parents=True)
    dist.barrier()
    stage = trainer.stage
    save_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx, str(partial / "model"))
    if ctx.tp_rank == 0 and ctx.pp_rank == 0:  # the buffer is replicated over a replica's TP/PP ranks
        save_ssb(trainer.buffer, partial / "ssb", step, ctx.dp_group)
    torch.save({"optimizer": trainer.optimizer.state_dict(), "reference": trainer.initial_trainable,
                "rng": _rng_state()}, partial / f"rank_{ctx.rank:05d}.pt")
    if ctx.rank == 0:
        meta = {"step": step, "data": trainer.loader.state_dict(), "layout": _layout(ctx)}
        (partial / "trainer.json").write_text(json.dumps(meta, indent=1))
    dist.barrier()
    if ctx.rank == 0:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        tmp_latest = save_dir / f".{LATEST}.tmp"
        tmp_latest.write_text(name + "\n")
        os.replace(tmp_latest, save_dir / LATEST)
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
    if meta["layout"] != _layout(ctx):
        raise ValueError(f"{path} was saved with parallel layout {meta['layout']}, this run is {_layout(ctx)}: "
                         "the optimizer state is per rank, resume with the same tp/pp/dp")
    stage = trainer.stage
    load_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx, str(path / "model"))
    per_rank = torch.load(path / f"rank_{ctx.rank:05d}.pt", weights_only=False)
    trainer.optimizer.load_state_dict(per_rank["optimizer"])
    trainer.initial_trainable = per_rank["reference"]
    trainer.buffer = load_ssb(path / "ssb", ctx.dp_rank, ctx.dp, trainer.buffer.config)
    trainer.loader.load_state_dict(meta["data"])
    torch.set_rng_state(per_rank["rng"]["torch"])
    if per_rank["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(per_rank["rng"]["cuda"])
    # The engine restarts from the restored weights: a full sync, not trainable-only.
    trainer.sync.sync(trainer.engine, full=True)
    return int(meta["step"])
