"""Launcher environments, parallel-size checks, and a one-process init on CPU."""

import pytest
import torch

from megatron_r1v.config import ParallelConfig
from megatron_r1v.platform import LaunchEnv, data_parallel_size, destroy_distributed, expand_slurm_nodelist, init_distributed


def test_torchrun_env():
    env = LaunchEnv.from_environ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0",
                                  "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    # torchrun's variables win over Slurm's (srun torchrun sets both).
    assert env == LaunchEnv(5, 8, 1, "n0", 1234, "torchrun")


def test_slurm_env():
    env = LaunchEnv.from_environ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                  "SLURM_JOB_NODELIST": "gpu[07-08,10],login", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (9, 16, 1, "gpu07")
    assert env.master_port == 20000 + 4242 and env.launcher == "slurm"


def test_single_process_env():
    assert LaunchEnv.from_environ({}).launcher == "single"
    assert LaunchEnv.from_environ({"MASTER_PORT": "1234"}).master_port == 1234
    # Without MASTER_PORT a one-process job picks a port that is free right now.
    import socket

    port = LaunchEnv.from_environ({}).master_port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    with pytest.raises(ValueError, match="malformed launcher environment"):
        LaunchEnv.from_environ({"RANK": "x", "WORLD_SIZE": "2"})


def test_expand_nodelist():
    assert expand_slurm_nodelist("a,b") == ["a", "b"]
    assert expand_slurm_nodelist("node[1-3]") == ["node1", "node2", "node3"]
    assert expand_slurm_nodelist("gpu[008-010,12],x[1]") == ["gpu008", "gpu009", "gpu010", "gpu12", "x1"]


def test_world_size_divisibility():
    assert data_parallel_size(16, 2, 4) == 2
    assert data_parallel_size(8, 2, 2, 2) == 1
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel.tp\*pp\*cp = 2\*2\*1 = 4"):
        data_parallel_size(6, 2, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="exercises the CPU path")
def test_init_single_process_cpu(unused_tcp_port):
    env = LaunchEnv(0, 1, 0, "127.0.0.1", unused_tcp_port, "single")
    with pytest.raises(ValueError, match="context parallelism needs CUDA"):
        init_distributed(ParallelConfig(cp=2), env=LaunchEnv(0, 2, 0, "127.0.0.1", unused_tcp_port, "single"))
    ctx = init_distributed(ParallelConfig(), seed=3, env=env)
    try:
        assert (ctx.backend, ctx.device.type, ctx.dp, ctx.tp_rank) == ("gloo", "cpu", 1, 0)
        assert ctx.is_first_stage and ctx.is_last_stage and ctx.cpu_mode is not None
        assert torch.zeros(1, device="cuda").device.type == "cpu"
    finally:
        destroy_distributed(ctx)
    assert not torch.distributed.is_initialized()
