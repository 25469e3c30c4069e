"""CPU mode: CUDA device rewriting, the CPU RNG tracker, and clean enable/disable."""

import pytest
import torch
from megatron.core.tensor_parallel import random as mcore_random

from megatron_r1v.cpu_mode import CpuMode, CpuRNGStatesTracker, cpu_mode_active

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode is for machines without CUDA")


@pytest.fixture
def cpu_mode():
    with CpuMode() as mode:
        yield mode


def test_cuda_devices_become_cpu(cpu_mode):
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.tensor([1.0], device="cuda:0").device.type == "cpu"
    t = torch.arange(4.0)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu" and t.to(device="cuda").device.type == "cpu"
    assert t.to(torch.float64).dtype == torch.float64  # non-device .to keeps working
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()  # waits are no-ops: CPU ops are already ordered
    stream.wait_event(None)
    stream.wait_stream(stream)


def test_type_query_reports_cuda_names_but_conversions_work(cpu_mode):
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1, dtype=torch.int64).type() == "torch.LongTensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_numerics_unchanged(cpu_mode):
    a = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    expected = (a @ a.T).softmax(-1)
    with torch.device("cuda"):
        got = (a @ a.T).softmax(-1)
    assert torch.equal(got, expected)


def test_rng_tracker_streams(cpu_mode):
    tracker = mcore_random.get_cuda_rng_tracker()
    assert isinstance(tracker, CpuRNGStatesTracker)
    tracker.reset()
    tracker.add("a", 11)
    tracker.add("b", 12)
    torch.manual_seed(0)
    outer_first = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("a"):
        a1 = torch.rand(3)
        with tracker.fork("b"):
            b1 = torch.rand(3)
        a2 = torch.rand(3)
    # The outer (default) stream is untouched by forks.
    assert torch.equal(torch.rand(3), outer_first)
    # Stream "a" continues where it left off; equals a fresh generator seeded 11.
    gen = torch.Generator().manual_seed(11)
    assert torch.equal(a1, torch.rand(3, generator=gen)) and torch.equal(a2, torch.rand(3, generator=gen))
    assert torch.equal(b1, torch.rand(3, generator=torch.Generator().manual_seed(12)))
    with pytest.raises(ValueError, match="seed 11 already used"):
        tracker.add("c", 11)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("zzz"):
            pass


def test_megatron_seeding_uses_cpu_streams(cpu_mode):
    mcore_random.model_parallel_cuda_manual_seed(5, tp_rank=1, ep_rank=0, etp_rank=0)
    tracker = mcore_random.get_cuda_rng_tracker()
    with tracker.fork():  # the model-parallel stream: seed + 2718 + tp_rank
        x = torch.rand(4)
    assert torch.equal(x, torch.rand(4, generator=torch.Generator().manual_seed(5 + 2718 + 1)))


def test_disable_restores_everything():
    original_current_device = torch.cuda.current_device
    original_tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    mode = CpuMode().enable()
    assert cpu_mode_active()
    with pytest.raises(RuntimeError, match="already enabled"):
        CpuMode().enable()
    mode.disable()
    assert not cpu_mode_active()
    assert torch.cuda.current_device is original_current_device
    assert mcore_random._CUDA_RNG_STATE_TRACKER is original_tracker
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
