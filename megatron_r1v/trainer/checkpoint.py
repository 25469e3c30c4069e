"""Training checkpoints of the MPO and GRPO stages: everything a resumed run needs to
continue exactly as an uninterrupted one would, at the same or another parallel layout.

    <save_dir>/step_000003/
        model/           Megatron dist checkpoint (torch_dist), TP/PP-independent fragments,
                         with r1v_checkpoint.json: ``tools/convert_checkpoint.py export``
                         turns it into an HF checkpoint, and ``model.checkpoint`` of the next
                         stage can start from it
        state/           Megatron dist checkpoint of the optimizer (Adam's moments and, for
                         bf16/fp16 parameters, the fp32 main copies, in the model's fragments:
                         ``checkpoint/optimizer_fragments.py``), the trainer's parameter-shaped
                         tensors (GRPO: ``reference/``) and, in its common part, Adam's step
                         count and loss scalers
        ssb/             GRPO: the Selective Sample Buffer (zarr, one group per DP rank)
        rank_00000.pt    per rank: the trainer's own small state (MPO: BCO's running reward
                         mean; the same on every rank) and the torch RNG states
        trainer.json     stage, step, data cursor, parallel layout
        manifest.json    size and SHA-256 of every file above, written last
                         (``checkpoint/manifest.py``); --resume verifies it first
    <save_dir>/latest    the name of the newest complete checkpoint
    <save_dir>/.lock     held by the running trainer (``trainer/run_folder.py``)

With ``train.keep_last: N`` the older checkpoints are deleted once a newer one is
committed and named by ``latest``.

A trainer provides ``rank_state()`` / ``load_rank_state(state)``, optionally
``sharded_tensors()`` (prefix -> {parameter name: tensor}, filled in place on resume), and
``save_files(dir, step)`` / ``load_files(dir)`` (collective) for what only it has.

A checkpoint is written into ``.step_000003.partial`` and committed by rank 0 after every
rank has finished (``atomic_dir``), then ``latest`` is replaced atomically; a save killed
halfway leaves the previous checkpoint and ``latest`` untouched.

Resuming at another TP / PP / DP (or number of nodes): the model, the optimizer state, the
trainer's tensors and the SSB are read in the pieces the new layout needs; the data cursor
and the learning-rate schedule are global. What is per rank cannot follow a new layout:
the trainer's small state is taken from rank 0 (it is replicated), and the torch RNG keeps
the fresh run's seeding (``train.seed``; nothing in training draws from it at dropout 0).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_r1v.atomic_dir import commit_directory, partial_directory, partial_path, write_text_atomic
from megatron_r1v.checkpoint.hf_io import CheckpointError
from megatron_r1v.checkpoint.manifest import verify, write_manifest
from megatron_r1v.checkpoint.model_fragments import load_into, load_model_checkpoint, save_fragments
from megatron_r1v.checkpoint.model_fragments import save_model_checkpoint
from megatron_r1v.checkpoint.optimizer_fragments import (
    apply_loaded,
    common_state,
    named_fragments,
    optimizer_fragments,
    optimizer_load_requests,
)
from megatron_r1v.platform import first_failure
from megatron_r1v.trainer.run_folder import LATEST, rotate_checkpoints


def _layout(ctx) -> dict:
    layout = {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "world_size": ctx.world_size}
    return layout if ctx.cp == 1 else {**layout, "cp": ctx.cp}  # cp=1 checkpoints keep their old layout record


def _rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


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
    """Writes the state after ``step`` steps (collective over all ranks); returns the folder.

    Every phase ends in an agreement over the ranks (:func:`_on_every_rank`), so a write
    that fails on one rank (a full disk, a read-only mount) raises the same
    :class:`CheckpointError` on all of them, naming the folder, the cause and the free
    space, instead of leaving the others in a barrier; the partial folder is removed and
    the previous checkpoints and ``latest`` are untouched."""
    save_dir = Path(save_dir)
    name = f"step_{step:06d}"
    final, partial = save_dir / name, partial_path(save_dir / name)
    stage, is_rank0 = trainer.stage, ctx.rank == 0

    def prepare() -> None:
        if is_rank0:
            partial_directory(final)  # fresh: a killed save may have left one
            (partial / "model").mkdir()
            (partial / STATE_DIR).mkdir()

    def write_rank_files() -> None:
        torch.save({"trainer": trainer.rank_state(), "rng": _rng_state()}, partial / f"rank_{ctx.rank:05d}.pt")
        if is_rank0:
            _write_model_meta(partial / "model", trainer)
            meta = {"stage": trainer.cfg.train.stage, "step": step, "data": trainer.loader.state_dict(),
                    "layout": _layout(ctx),
                    "init_layout": getattr(trainer, "init_layout", None) or {"tp": ctx.tp, "pp": ctx.pp}}
            write_text_atomic(partial / "trainer.json", json.dumps(meta, indent=1))

    _on_every_rank(prepare, partial, ctx.device)
    _on_every_rank(lambda: save_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx,
                                                 str(partial / "model")), partial, ctx.device)
    # The state dict is built in a phase of its own (it has collectives of its own): a rank
    # failing there must not leave the others inside the save's collectives.
    state: dict = {}
    _on_every_rank(lambda: state.update(_state_to_save(trainer, ctx)), partial, ctx.device)
    _on_every_rank(lambda: save_fragments(state, str(partial / STATE_DIR)), partial, ctx.device)
    _on_every_rank(lambda: trainer.save_files(partial, step), partial, ctx.device)
    _on_every_rank(write_rank_files, partial, ctx.device)
    started = time.perf_counter()
    manifest = write_manifest(partial)  # last, collective: every rank hashes a share of the files
    _on_every_rank(lambda: _commit(save_dir, name, partial, manifest, time.perf_counter() - started, trainer)
                   if is_rank0 else None, partial, ctx.device)
    return final


STATE_DIR = "state"
"""The optimizer and trainer tensors of a checkpoint (a Megatron dist checkpoint)."""


def _trainer_tensors(trainer) -> dict[str, dict[str, torch.Tensor]]:
    hook = getattr(trainer, "sharded_tensors", None)
    return hook() if hook is not None else {}


def _state_to_save(trainer, ctx) -> dict:
    """The ``state/`` dict: the optimizer state, the trainer's tensors and their common
    scalars (collective: distributed-optimizer pieces are reduced onto their writers)."""
    stage = trainer.stage
    state = optimizer_fragments(trainer.optimizer, stage.model, stage.stage_maps, stage.shard_spec, ctx)
    for prefix, tensors in _trainer_tensors(trainer).items():
        state.update(named_fragments(prefix, tensors, stage.stage_maps, stage.shard_spec, ctx)[0])
    state["common"] = {"optimizer": common_state(trainer.optimizer, ctx.device)}
    return state


def _load_state(trainer, ctx, directory: Path) -> None:
    """Fills the optimizer and the trainer's tensors from ``state/`` at this run's layout."""
    from megatron.core import dist_checkpointing

    stage = trainer.stage
    metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    state, views, targets = optimizer_load_requests(trainer.optimizer, stage.model, stage.stage_maps,
                                                    stage.shard_spec, ctx, metadata)
    for prefix, tensors in _trainer_tensors(trainer).items():
        extra_state, extra_views = named_fragments(prefix, tensors, stage.stage_maps, stage.shard_spec, ctx)
        missing = sorted(st.key for st in extra_state.values() if st.key not in metadata)
        if missing:
            raise KeyError(f"checkpoint {directory} has no tensor {missing[0]!r}: the run that saved it had no "
                           f"{prefix} tensors (GRPO's reference exists with grpo.kl_beta > 0)")
        state.update(extra_state)
        views.update(extra_views)
    loaded = load_into(state, views, str(directory))
    apply_loaded(trainer.optimizer, targets, loaded["common"]["optimizer"])


def _commit(save_dir: Path, name: str, partial: Path, manifest: Path, hash_s: float, trainer) -> None:
    """Rank 0: the folder into place, then ``latest``, then the rotation (train.keep_last)."""
    files = json.loads(manifest.read_text())["files"]
    print(f"checkpoint {name}: {len(files)} files, {sum(f['size'] for f in files.values()) / 2**20:.1f} MiB, "
          f"manifest hashed in {hash_s:.2f} s", flush=True)
    # A checkpoint of the same step being replaced is deleted only once the new one is in
    # place, and `latest` names it only after that.
    commit_directory(partial, save_dir / name)
    write_text_atomic(save_dir / LATEST, name + "\n")
    for removed in rotate_checkpoints(save_dir, trainer.cfg.train.keep_last):
        print(f"train.keep_last={trainer.cfg.train.keep_last}: removed {removed}", flush=True)


def _on_every_rank(phase, partial: Path, device: torch.device) -> None:
    """Runs one phase of a save on this rank, then agrees with the others (one all-reduce):
    when any rank failed, every rank raises CheckpointError with the first failure, and
    rank 0 removes the partial folder (space back, nothing half-written left)."""
    failure = None
    try:
        phase()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # any (torch's CheckpointException is a BaseException): all ranks must hear
        failure = _storage_error(err, partial)
    first = first_failure(failure, device)
    if first is None:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    raise CheckpointError(first)


_FULL_BYTES = 16 * 2**20
"""Less free space than this after a failed write: the disk is full, whatever the error says."""


def _errno_in(err: BaseException) -> Optional[int]:
    """The OS error number behind ``err``: its own, one in its cause / context chain, or one
    in the text of a wrapper (torch's CheckpointException reports every rank's failure so)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    return next((code for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)
                 if f"[Errno {code}]" in text or os.strerror(code) in text), None)


def _storage_error(err: BaseException, partial: Path) -> str:
    """One line: which checkpoint, the cause (no space, read-only, ...), the free space."""
    causes = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}
    code = _errno_in(err)
    cause = causes.get(code, f"{type(err).__name__}: {err}")
    try:
        usage = shutil.disk_usage(partial.parent)
    except OSError:
        usage = None
    space = ""
    if usage is not None:
        total = f"{usage.total / 2**30:.1f} GiB" if usage.total >= 2**30 else f"{usage.total / 2**20:.1f} MiB"
        space = f"; {usage.free / 2**20:.1f} MiB free of {total} on its file system"
        if code is None and usage.free < _FULL_BYTES:
            # torch.save reports a full disk as "unexpected pos ..." with no errno.
            code, cause = errno.ENOSPC, f"no space left on the device ({type(err).__name__}: {err})"
    # torch's CheckpointException carries every failing rank's exception: name those ranks.
    failures = getattr(err, "failures", None)
    ranks = sorted(failures) if isinstance(failures, dict) and failures else [dist.get_rank()]
    if isinstance(failures, dict) and failures and code is None:
        first = failures[ranks[0]][0] if isinstance(failures[ranks[0]], tuple) else failures[ranks[0]]
        cause = f"{type(first).__name__}: {first}"
    where = "rank " + ", ".join(map(str, ranks)) if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
    final = partial.parent / partial.name.lstrip(".").removesuffix(".partial")
    return f"writing checkpoint {final} failed on {where}: {cause}{space} (the previous checkpoints are intact)"


def latest_checkpoint(save_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under ``save_dir``, or None."""
    marker = Path(save_dir) / LATEST
    if not marker.is_file():
        return None
    path = Path(save_dir) / marker.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{marker} names {path}, which is not a complete checkpoint (no trainer.json)")
    return path


def checkpoint_step(save_dir: str | Path) -> Optional[tuple[int, str]]:
    """(step, folder name) of the newest complete checkpoint under ``save_dir``, or None."""
    latest = latest_checkpoint(save_dir)
    if latest is None:
        return None
    return int(json.loads((latest / "trainer.json").read_text())["step"]), latest.name


def init_layout(path: str | Path) -> dict:
    """{"tp", "pp"} at which the run that wrote checkpoint ``path`` (or the run it resumed)
    drew its random initial weights: Megatron's random initialization depends on them."""
    meta = json.loads((Path(path) / "trainer.json").read_text())
    return meta.get("init_layout") or {"tp": meta["layout"]["tp"], "pp": meta["layout"]["pp"]}


def load_checkpoint(path: str | Path, trainer, ctx) -> int:
    """Restores ``trainer`` from ``path`` at this run's parallel layout, whichever layout saved
    it; returns the number of steps already done."""
    path = Path(path)
    meta = json.loads((path / "trainer.json").read_text())
    if meta.get("stage", "grpo") != trainer.cfg.train.stage:
        raise ValueError(f"{path} is a {meta.get('stage', 'grpo')} checkpoint; this run is train.stage="
                         f"{trainer.cfg.train.stage} (start a new stage from it with model.checkpoint={path}/model)")
    if not (path / STATE_DIR).is_dir():
        raise ValueError(f"{path} has no {STATE_DIR}/ folder: it was written by an older megatron-r1v with "
                         "per-rank optimizer files, which this version does not read; start a new run from its "
                         f"weights with model.checkpoint={path}/model")
    verify(path)  # every file against the manifest (collective), before anything is read
    same_layout = meta["layout"] == _layout(ctx)
    if not same_layout and ctx.rank == 0:
        print(f"resuming {path} saved at {meta['layout']} with {_layout(ctx)}: model, optimizer, trainer tensors "
              "and SSB resharded; the torch RNG is this run's fresh seeding", flush=True)
    # Carried into this run's checkpoints (MPO keys its reference cache by it; trainer.json).
    trainer.init_layout = init_layout(path)
    stage = trainer.stage
    load_model_checkpoint(stage.model, stage.stage_maps, stage.shard_spec, ctx, str(path / "model"), verify=False)
    _load_state(trainer, ctx, path / STATE_DIR)
    per_rank = torch.load(path / f"rank_{ctx.rank if same_layout else 0:05d}.pt", weights_only=False)
    trainer.load_rank_state(per_rank["trainer"])
    trainer.load_files(path)
    trainer.loader.load_state_dict(meta["data"])
    if same_layout:
        torch.set_rng_state(per_rank["rng"]["torch"])
        if per_rank["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(per_rank["rng"]["cuda"])
    return int(meta["step"])
