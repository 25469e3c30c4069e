"""Shared fixtures: a tiny random Qwen2 reference model and a torchrun launcher."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA, the Triton kernels run in Triton's interpreter. Triton reads this once,
# when it is first imported, so it is set before any test module imports it; torchrun
# workers inherit it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def torchrun():
    """Runs a worker script under torchrun with N CPU processes; fails with its output."""

    def run(script: str, nproc: int, args: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / script), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"torchrun {script} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                f"\n--- stderr\n{proc.stderr[-8000:]}"
            )
        return proc

    return run


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """transformers' Qwen2ForCausalLM with the tiny-qwen2 architecture and random weights.

    Norm weights and biases are perturbed away from their init (ones / zeros) so a
    mapping that drops or swaps them cannot pass. Returns paths and the eager model.
    """
    import transformers
    from safetensors.torch import save_file

    from megatron_r1v.models.r1v.hf_mapping import decoder_arch_to_hf_config
    from megatron_r1v.models.r1v.presets import get_preset

    arch = get_preset("tiny-qwen2").decoder
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**decoder_arch_to_hf_config(arch))
    config._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    root = tmp_path_factory.mktemp("tiny_qwen2")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    # 8 sequences of 16 tokens (+1 for the shifted labels).
    data = torch.randint(0, arch.vocab_size, (8, 17), generator=torch.Generator().manual_seed(1))
    torch.save(data, root / "data.pt")
    return {"arch": arch, "model": model, "weights": root / "model.safetensors", "data": root / "data.pt", "root": root}


@pytest.fixture
def unused_tcp_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
