"""Distributed initialization for torchrun and Slurm, on GPUs (NCCL) or CPUs (gloo).

``init_distributed`` reads the launcher's environment, picks the device and backend
(NCCL with CUDA, gloo and the CPU mode of :mod:`megatron_r1v.cpu_mode` without),
initializes ``torch.distributed`` and Megatron-Core's parallel state for TP x PP x CP x
DP, seeds the RNG streams and returns a :class:`ParallelContext` that the rest of the
library receives explicitly (no module reaches for process groups on its own).

Rank order is Megatron's default ``tp-cp-ep-dp-pp``: TP ranks are adjacent (same node),
PP is outermost.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from megatron_r1v.config import ParallelConfig
from megatron_r1v.cpu_mode import CpuMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by torchrun or Slurm."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """"torchrun", "slurm" or "single" (no launcher: a one-process job)."""

    @classmethod
    def from_environ(cls, env: Optional[Mapping[str, str]] = None) -> "LaunchEnv":
        env = os.environ if env is None else env
        try:
            if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also `srun torchrun`)
                return cls(
                    rank=int(env["RANK"]),
                    world_size=int(env["WORLD_SIZE"]),
                    local_rank=int(env.get("LOCAL_RANK", "0")),
                    master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                    master_port=int(env.get("MASTER_PORT", "29500")),
                    launcher="torchrun",
                )
            if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # one srun task per rank
                nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
                addr = env.get("MASTER_ADDR") or (expand_slurm_nodelist(nodelist) or ["127.0.0.1"])[0]
                job_id = int(env.get("SLURM_JOB_ID", "0"))
                return cls(
                    rank=int(env["SLURM_PROCID"]),
                    world_size=int(env["SLURM_NTASKS"]),
                    local_rank=int(env.get("SLURM_LOCALID", "0")),
                    master_addr=addr,
                    # A job-specific port lets several jobs share a first node.
                    master_port=int(env.get("MASTER_PORT", str(20000 + job_id % 20000))),
                    launcher="slurm",
                )
        except ValueError as err:
            raise ValueError(f"malformed launcher environment variable: {err}") from None
        # A one-process job needs a rendezvous port too; a fixed default would collide
        # with any other one-process job (two exports) on the same machine.
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
        return cls(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expands Slurm's compressed host list, e.g. ``gpu[01-03,07],login1``."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def data_parallel_size(world_size: int, tp: int, pp: int, cp: int = 1) -> int:
    """DP size implied by the world size; ValueError when TP*PP*CP does not divide it."""
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tp*pp*cp = "
            f"{tp}*{pp}*{cp} = {model_parallel}"
        )
    return world_size // model_parallel


@dataclass
class ParallelContext:
    """Sizes, ranks, groups and the device of this process; passed to every component."""

    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    """Data-parallel group: ranks that see different data (CP peers, which hold the same
    micro-batches, are not in it; Megatron's DDP reduces gradients over DP x CP itself)."""
    device: torch.device
    backend: str
    env: LaunchEnv
    cpu_mode: Optional[CpuMode] = None
    cp_group: Optional[dist.ProcessGroup] = None
    """Context-parallel group: the ranks that split each packed row (``models.r1v.context_parallel``)."""
    dp_cp_group: Optional[dist.ProcessGroup] = None
    """Data-parallel group with CP folded in (what Megatron's gradient reduction uses)."""

    @property
    def replica_rank(self) -> int:
        """This rank's index among the ranks holding the same model shard (DP x CP); 0 is
        the main replica, the one that writes replicated checkpoint tensors."""
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def rank(self) -> int:
        return self.env.rank


def context_from_parallel_state(parallel: ParallelConfig, env: LaunchEnv, device: torch.device, backend: str,
                                cpu_mode: Optional[CpuMode] = None) -> ParallelContext:
    """The :class:`ParallelContext` of this process, read from Megatron-Core's initialized parallel state."""
    from megatron.core import parallel_state

    return ParallelContext(
        tp=parallel.tp,
        pp=parallel.pp,
        cp=parallel.cp,
        dp=data_parallel_size(env.world_size, parallel.tp, parallel.pp, parallel.cp),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        device=device,
        backend=backend,
        env=env,
        cpu_mode=cpu_mode,
        cp_group=parallel_state.get_context_parallel_group(),
        dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
    )


def init_distributed(
    parallel: ParallelConfig,
    seed: int = 1234,
    env: Optional[LaunchEnv] = None,
    force_cpu: bool = False,
) -> ParallelContext:
    """Initializes torch.distributed and Megatron-Core's parallel state; see module doc."""
    from megatron.core import parallel_state, tensor_parallel

    env = env or LaunchEnv.from_environ()
    use_cuda = torch.cuda.is_available() and not force_cpu
    dp = data_parallel_size(env.world_size, parallel.tp, parallel.pp, parallel.cp)
    if not use_cuda and parallel.cp != 1:
        raise ValueError(f"parallel.cp={parallel.cp}: context parallelism needs CUDA; use cp=1 on CPU")

    cpu_mode = None
    if use_cuda:
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        cpu_mode = CpuMode().enable()
        device = torch.device("cpu")
        backend = "gloo"

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}" if env.launcher != "torchrun" else None,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=parallel.timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    ctx = context_from_parallel_state(parallel, env, device, backend, cpu_mode)
    if env.rank == 0:
        logger.info(
            "distributed: %s backend, world %d = tp %d x pp %d x cp %d x dp %d (%s)",
            backend, env.world_size, parallel.tp, parallel.pp, parallel.cp, dp, env.launcher,
        )
    return ctx


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device collectives on ``group`` need: CUDA for NCCL, CPU otherwise (gloo, or no
    process group)."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def first_failure(local: Optional[str], device: torch.device,
                  group: Optional[dist.ProcessGroup] = None) -> Optional[str]:
    """The first (lowest-rank) failure message any rank of ``group`` passed, on every rank;
    None when none failed. Collective: one scalar all-reduce, plus an all-gather of the
    messages only when something failed. Without a process group: ``local``."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    flag = torch.tensor([0.0 if local is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return None
    messages: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, local, group=group)
    return next(m for m in messages if m is not None)


def destroy_distributed(ctx: ParallelContext) -> None:
    """Tears down Megatron's parallel state, the process group and the CPU mode."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    if ctx.cpu_mode is not None:
        ctx.cpu_mode.disable()
