"""Shared fixtures: a tiny random Qwen2 reference model, a torchrun launcher, a reward server."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from kernel_marks import kernel_backend_unavailable  # tests/ is on sys.path (pytest.ini: pythonpath)

# The Triton mode of this process, chosen once: triton.jit reads TRITON_INTERPRET when the
# kernel module is imported, so a process either interprets every Triton kernel (on CPU
# tensors) or compiles every one (for CUDA tensors), never both. Without CUDA it
# interprets; with CUDA it compiles unless TRITON_INTERPRET=1 was set by hand. torchrun
# workers inherit it (tests/kernel_marks.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "kernel_backend(name): the test runs the fused kernels' backend `name` (torch, interpret or "
        "triton); it is skipped, with the reason, where this process cannot run that backend")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("kernel_backend"):
        cuda_reason = kernel_backend_unavailable(mark.args[0])  # only CUDA reasons (tests/kernel_marks.py)
        if cuda_reason:  # on a CPU host: the compiled Triton backend needs a CUDA GPU
            pytest.skip(f"[CUDA] {cuda_reason}")


@pytest.fixture(scope="session")
def torchrun():
    """Runs a worker script under torchrun with N CPU processes; fails with its output."""

    def run(script: str, nproc: int, args: list[str], timeout: int = 600, check: bool = True,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
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

    from megatron_r1v.models.r1v.hf_config import decoder_arch_to_hf_config
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


def save_tiny_reward_model(root: Path, vocab_size: int, texts: Optional[list] = None) -> Path:
    """``rewards.reward_model.save_random_reward_model`` into ``root``; ``texts`` first train a
    project tokenizer there (otherwise ``root`` must already hold one of ``vocab_size`` tokens)."""
    from megatron_r1v.data.tokenizer import save_hf_tokenizer, train_tokenizer
    from megatron_r1v.rewards.reward_model import save_random_reward_model

    if texts is not None:
        save_hf_tokenizer(train_tokenizer(texts, vocab_size), root)
    return save_random_reward_model(root, vocab_size)


@contextlib.contextmanager
def reward_server(model_dir: Path, log: Path, *extra: str):
    """tools/serve_reward_model.py on a free port; yields its startup info (read from its first line)."""
    import select

    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "serve_reward_model.py"), "--model", str(model_dir),
             "--port", "0", *extra], stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, env=env)
    try:
        # Block on the startup line itself (bounded, in case the tool hangs before printing).
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            raise AssertionError(f"server printed no startup line; stderr:\n{log.read_text()[-4000:]}")
        yield json.loads(line)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="session")
def reward_tools():
    """``save_model(root, vocab_size, texts=None)`` and ``serve(model_dir, log, *args)`` (a context
    manager yielding the server's startup info) for tests that need a real reward server."""
    import types

    return types.SimpleNamespace(save_model=save_tiny_reward_model, serve=reward_server)
