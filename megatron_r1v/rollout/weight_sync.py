"""Streaming the trainer's Megatron weights into a rollout engine under HF names.

Who receives: the first TP rank of the first pipeline stage of a model replica (the
"owner"; global rank 0 for replica 0). By default only data-parallel replica 0 syncs,
which is the CPU setup (one HF engine on global rank 0). With ``every_dp_replica`` the
owner of each replica receives, which is the colocated layout: one engine per
replica, living on the GPUs of that replica and fed by its first rank. The engine is
always handed full (unsharded) HF tensors; an engine with its own tensor parallelism
(SGLang) shards them for its workers itself. The replicas hold identical weights, so
each syncs from its own ranks without any traffic between replicas.

How, per pipeline stage in order: every TP rank of the stage all-gathers each tensor
over ``ctx.tp_group``; the stage's first TP rank turns the shards into HF tensors
(``hf_mapping.mcore_shards_to_hf``: qkv de-interleave, fc1 split, vocabulary and dummy
heads dropped) and packs them into buckets of at most ``bucket_bytes``. Stage 0's owner
hands its buckets straight to ``engine.update_weights``; a later stage sends each bucket
point-to-point to the owner over ``ctx.pp_group`` (a metadata message, then one flat
tensor). No rank ever holds more than one bucket, or one tensor when a single tensor
is larger than ``bucket_bytes`` (the vocabulary of a 32B model is ~1.5 GB in bf16).

What: the first sync sends every tensor; later ones only parameters with
``requires_grad`` (the freeze policy's trainable set, e.g. the ~92M adapter weights of
R1V2-38B instead of 38B), since frozen weights cannot have changed. ``sync(full=True)``
forces a full pass (after loading a checkpoint or changing the freeze policy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_r1v.checkpoint.weights import iter_stage_hf_tensors, model_stage_maps, unwrap_model
from megatron_r1v.models.r1v.hf_mapping import SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT, HFLayout, ShardSpec, TensorMap
from megatron_r1v.models.r1v.presets import R1VArch
from megatron_r1v.platform import ParallelContext
from megatron_r1v.rollout.engine import RolloutEngine

Bucket = list[tuple[str, torch.Tensor]]

# The names each engine loads: transformers' in-memory InternVL names (HF engine), or the
# released InternVL-chat checkpoint names, which SGLang's InternVL model loads.
ENGINE_LAYOUTS: dict[str, HFLayout] = {"hf": TRANSFORMERS_LAYOUT, "sglang": SKYWORK_LAYOUT}


@dataclass(frozen=True)
class SyncStats:
    """One sync seen from one rank. On an owner: what reached its engine. On a later
    stage's first TP rank: what it sent to the owner. Zero on other ranks."""

    full: bool
    tensors: int
    bytes: int
    buckets: int
    seconds: float


class WeightsOutOfSync(RuntimeError):
    """The engine's weights differ from the trainer's (raised on every rank)."""

    def __init__(self, message: str, name: Optional[str], max_abs_diff: float) -> None:
        super().__init__(message)
        self.name = name
        self.max_abs_diff = max_abs_diff


class WeightSync:
    """Megatron model stage -> rollout engine. Every rank of the job calls :meth:`sync`
    and :meth:`check_in_sync` together (they are collective); ``engine`` matters only on
    receiving ranks (see the module docstring) and may be None elsewhere."""

    def __init__(
        self,
        arch: R1VArch,
        ctx: ParallelContext,
        model_chunks: Sequence[torch.nn.Module],
        *,
        trainable_only_after_first: bool = True,
        bucket_bytes: int = 512 << 20,
        shard_spec: Optional[ShardSpec] = None,
        backend: str = "local",
        every_dp_replica: bool = False,
        layout: HFLayout = TRANSFORMERS_LAYOUT,
    ) -> None:
        """``shard_spec``: the model stage's (``ModelStage.shard_spec``); the default is
        ``ShardSpec.for_model(arch, ctx.tp)``, right for the default vocabulary padding.
        ``backend``: the model's layer backend ("te" renames the fused norm weights).
        ``layout``: the names the engine loads (``ENGINE_LAYOUTS[rollout.engine]``)."""
        if len(model_chunks) != 1:
            raise ValueError(f"weight sync supports one model chunk per rank, got {len(model_chunks)} "
                             "(virtual pipeline stages are not supported)")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.ctx = ctx
        self.bucket_bytes = bucket_bytes
        self.trainable_only_after_first = trainable_only_after_first
        self.spec = shard_spec or ShardSpec.for_model(arch, ctx.tp)
        self.stage_maps: dict[str, TensorMap] = model_stage_maps(arch, ctx, layout, backend)
        self.params = dict(unwrap_model(model_chunks[0]).named_parameters())
        unknown = sorted(set(self.params) - set(self.stage_maps))
        absent = sorted(set(self.stage_maps) - set(self.params))
        if unknown or absent:
            raise ValueError(f"model and HF mapping disagree on stage {ctx.pp_rank}: parameters without a mapping "
                             f"{unknown[:5]}, mapped names missing from the model {absent[:5]}")
        self.active = every_dp_replica or ctx.dp_rank == 0
        self.is_owner = self.active and ctx.tp_rank == 0 and ctx.pp_rank == 0
        # Global ranks: point-to-point calls address ranks of the default group.
        self._pp_ranks = dist.get_process_group_ranks(ctx.pp_group)
        self._synced_once = False

    # --- public ----------------------------------------------------------------------

    def sync(self, engine: Optional[RolloutEngine], full: Optional[bool] = None) -> SyncStats:
        """Pushes weights into ``engine``: everything on the first call (or ``full``),
        afterwards the trainable parameters only (``trainable_only_after_first``)."""
        if full is None:
            full = not (self._synced_once and self.trainable_only_after_first)
        if self.is_owner and engine is None:
            raise ValueError(f"rank {self.ctx.rank} receives the weights (first TP rank of the first stage) "
                             "but was given no engine")
        start = time.perf_counter()
        sent, received = _Counts(), _Counts()
        for bucket in self._stream(full, sent):
            engine.update_weights(bucket)  # only owners receive buckets
            received.add(bucket)
        self._synced_once = self._synced_once or full
        counts = received if self.is_owner else sent
        return SyncStats(full, counts.tensors, counts.bytes, counts.buckets, time.perf_counter() - start)

    def check_in_sync(self, engine: Optional[RolloutEngine], atol: float = 0.0) -> float:
        """Max |engine - trainer| over all weights, the same on every rank; raises
        :class:`WeightsOutOfSync` naming the first tensor over ``atol`` or missing on
        either side. The trainer's tensor is cast to the engine's dtype first, so an
        fp32 or bf16 engine that was synced compares exactly (``atol=0``)."""
        result: Optional[tuple[float, Optional[str], Optional[str]]] = None
        if self.is_owner:
            if engine is None:
                raise ValueError(f"rank {self.ctx.rank} owns the engine weights but was given no engine")
            result = self._compare(engine, atol)
        else:
            for _ in self._stream(True, _Counts()):
                pass
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, result)
        reports = [r for r in everyone if r is not None]
        max_diff = max((r[0] for r in reports), default=0.0)
        for diff, name, message in reports:
            if message is not None:
                raise WeightsOutOfSync(message, name, max_diff)
        return max_diff

    # --- streaming -------------------------------------------------------------------

    def _stream(self, full: bool, sent: "_Counts") -> Iterator[Bucket]:
        """Yields every bucket on owners; elsewhere drives the gathers and sends (counted in
        ``sent``) and yields nothing. All ranks of a replica must consume it to the end."""
        if not self.active:
            return
        ctx = self.ctx
        owner = self._pp_ranks[0]
        for stage in range(ctx.pp):
            if stage == ctx.pp_rank:
                for bucket in self._local_buckets(full):
                    if stage == 0:
                        yield bucket
                    else:
                        self._send(bucket, owner)
                        sent.add(bucket)
                if stage > 0 and ctx.tp_rank == 0:
                    dist.send_object_list([None], dst=owner, group=ctx.pp_group)  # end of this stage
            elif self.is_owner:
                while (bucket := self._recv(self._pp_ranks[stage])) is not None:
                    yield bucket

    def _local_buckets(self, full: bool) -> Iterator[Bucket]:
        """This stage's tensors under HF names, in buckets, on the stage's first TP rank."""
        ctx = self.ctx
        bucket: Bucket = []
        size = 0
        # requires_grad is set by name, so the filter agrees on every TP rank.
        include = None if full else (lambda param: param.requires_grad)
        for hf_name, tensor in iter_stage_hf_tensors(self.params, self.stage_maps, self.spec, ctx, include=include):
            tensor = tensor.contiguous()
            if bucket and (size + _nbytes(tensor) > self.bucket_bytes or tensor.dtype != bucket[0][1].dtype):
                yield bucket
                bucket, size = [], 0
            bucket.append((hf_name, tensor))
            size += _nbytes(tensor)
        if bucket:
            yield bucket

    def _send(self, bucket: Bucket, dst: int) -> None:
        meta = [(name, tuple(t.shape)) for name, t in bucket]
        flat = torch.cat([t.reshape(-1) for _, t in bucket])
        dist.send_object_list([(meta, flat.dtype, flat.numel())], dst=dst, group=self.ctx.pp_group)
        dist.send(flat, dst=dst, group=self.ctx.pp_group)

    def _recv(self, src: int) -> Optional[Bucket]:
        header: list = [None]
        dist.recv_object_list(header, src=src, group=self.ctx.pp_group)
        if header[0] is None:
            return None
        meta, dtype, numel = header[0]
        flat = torch.empty(numel, dtype=dtype, device=self.ctx.device)
        dist.recv(flat, src=src, group=self.ctx.pp_group)
        bucket, offset = [], 0
        for name, shape in meta:
            n = _numel(shape)
            bucket.append((name, flat[offset: offset + n].view(shape)))
            offset += n
        return bucket

    def _compare(self, engine: RolloutEngine, atol: float) -> tuple[float, Optional[str], Optional[str]]:
        """Owner side of :meth:`check_in_sync`: streams the trainer's weights (all of them)
        against the engine's; returns (max diff, first bad name, message or None)."""
        weights = dict(engine.named_weights())
        seen: set[str] = set()
        max_diff, bad_name, message = 0.0, None, None
        for bucket in self._stream(True, _Counts()):
            for name, trainer in bucket:
                seen.add(name)
                held = weights.get(name)
                problem = None
                if held is None:
                    problem = f"trainer tensor {name!r} has no engine weight of that name"
                elif held.shape != trainer.shape:
                    problem = f"tensor {name!r}: engine holds {tuple(held.shape)}, trainer has {tuple(trainer.shape)}"
                elif held.numel():
                    diff = float((held.float() - trainer.to(held.device, held.dtype).float()).abs().max())
                    max_diff = max(max_diff, diff)
                    if not diff <= atol:  # also catches NaN
                        problem = f"tensor {name!r}: engine differs from the trainer by {diff:.3e} > {atol}"
                if problem is not None and message is None:
                    bad_name, message = name, problem
        missing = sorted(set(weights) - seen)
        if message is None and missing:
            bad_name, message = missing[0], f"{len(missing)} engine weights have no trainer tensor, e.g. {missing[:3]}"
        return max_diff, bad_name, message


@dataclass
class _Counts:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0

    def add(self, bucket: Bucket) -> None:
        self.tensors += len(bucket)
        self.bytes += sum(_nbytes(t) for _, t in bucket)
        self.buckets += 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
