"""EngineProcess: the HF engine in a child process (rollout.mode async) against the same engine
in this process, its weight updates, the split generate, and its named failures."""

import functools
import os
import signal
import time

import pytest
import torch

from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.rollout.engine import RolloutRequest, SamplingParams
from megatron_r1v.rollout.engine_process import EngineProcess, EngineProcessError
from megatron_r1v.rollout.hf_engine import HFRolloutEngine

ARCH = get_preset("tiny-r1v")
IMG, PER_TILE, SIDE = ARCH.image_token_id, ARCH.tokens_per_tile, ARCH.vision.image_size


def _engine(seed: int) -> HFRolloutEngine:
    """Module level: the child builds it from this picklable partial."""
    return HFRolloutEngine.from_arch(ARCH, seed=seed)


def _broken_engine() -> HFRolloutEngine:
    raise OSError("no such model folder: /nowhere")


@pytest.fixture(scope="module")
def pair():
    """The same random engine (seed 0) here and in a child process (one thread there, as in
    this process under OMP_NUM_THREADS=1: the same reduction order)."""
    local = _engine(0)
    with EngineProcess(functools.partial(_engine, 0), threads=torch.get_num_threads()) as remote:
        yield local, remote


def requests():
    gen = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.randint(0, IMG, (3,), generator=gen), torch.full((PER_TILE,), IMG),
                     torch.randint(0, IMG, (4,), generator=gen)])
    return [RolloutRequest("img", ids, torch.randn(1, 3, SIDE, SIDE, generator=gen)),
            RolloutRequest("text", torch.randint(0, IMG, (7,), generator=gen), max_new_tokens=3)]


def test_generation_in_the_child_equals_the_engine_here(pair):
    """Same weights, seed and requests: the same ids and the same log-probs, bit for bit (the
    child runs the same code on the same fp32 weights); the split call gives the same."""
    local, remote = pair
    params = SamplingParams(n=3, max_new_tokens=5, seed=11, temperature=1.0)
    here, there = local.generate(requests(), params), remote.generate(requests(), params)
    assert [len(g) for g in there] == [3, 3]
    for group_here, group_there in zip(here, there):
        for a, b in zip(group_here, group_there):
            assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
            assert (a.prompt_id, a.finished, a.text) == (b.prompt_id, b.finished, b.text)
    assert max(len(s.response_ids) for s in there[1]) <= 3  # the per-request budget travelled too
    remote.start_generate(requests(), params)
    assert remote.generating
    result = remote.finish_generate()
    assert not remote.generating and result.generate_seconds > 0 and result.wait_seconds >= 0
    assert all(torch.equal(a.response_ids, b.response_ids) for a, b in zip(there[0], result.samples[0]))


def test_weight_updates_reach_the_child(pair):
    """A changed head changes the child's generation as it changes this one's, and
    named_weights reads the child's tensors back."""
    local, remote = pair
    head = dict(local.named_weights())["lm_head.weight"] * 25
    for engine in (local, remote):
        engine.update_weights([("lm_head.weight", head)])
    assert torch.equal(dict(remote.named_weights())["lm_head.weight"], head)
    params = SamplingParams(n=2, max_new_tokens=4, seed=5)
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in
               zip(local.generate(requests(), params)[0], remote.generate(requests(), params)[0]))


def test_calls_while_generating_and_engine_errors_are_named(pair):
    _, remote = pair
    remote.start_generate(requests(), SamplingParams(n=2, max_new_tokens=3))
    with pytest.raises(EngineProcessError, match=r"update_weights\(\) while a generation is running"):
        remote.update_weights([])
    remote.finish_generate()
    with pytest.raises(EngineProcessError, match="finish_generate.. without a generation"):
        remote.finish_generate()
    # The engine's own validation, raised in the child, comes back with its message; the child serves on.
    bad = RolloutRequest("bad", torch.full((PER_TILE,), IMG))  # image tokens but no pixels
    with pytest.raises(EngineProcessError, match="request bad: .* image tokens"):
        remote.generate([bad], SamplingParams(n=2, max_new_tokens=2))
    with pytest.raises(EngineProcessError, match="engine has no weight 'nope'"):
        remote.update_weights([("nope", torch.zeros(1))])
    assert len(remote.generate(requests()[:1], SamplingParams(n=2, max_new_tokens=2))[0]) == 2


def test_a_child_that_dies_or_cannot_build_is_reported():
    with pytest.raises(EngineProcessError, match="building the engine: OSError: no such model folder"):
        EngineProcess(_broken_engine)
    engine = EngineProcess(functools.partial(_engine, 1))
    engine.start_generate(requests(), SamplingParams(n=2, max_new_tokens=2000))
    os.kill(engine.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(EngineProcessError, match=r"exited with code -9 during generate"):
        engine.finish_generate()
    assert time.monotonic() - started < 30  # noticed by polling, not by a hang
    engine.close()
    with pytest.raises(EngineProcessError, match=r"generate\(\) after close"):
        engine.generate(requests(), SamplingParams(n=2))


def test_closing_with_a_generation_in_flight_does_not_wait_for_it():
    engine = EngineProcess(functools.partial(_engine, 2))
    engine.start_generate(requests(), SamplingParams(n=4, max_new_tokens=4000))
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 10 and not engine._process.is_alive()
