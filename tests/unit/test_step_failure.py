"""trainer/failure.py: a failed step is agreed on by every rank and, before the weights
changed, undone exactly: data cursor, RNG, SSB draw state (the stop checkpoint then holds
the state after the previous step)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_r1v.trainer.failure import StepFailure, StepSnapshot, agree_on_failure, describe

sys.path.insert(0, str(Path(__file__).parent))
from test_ssb import varied_buffer  # noqa: E402  (the SSB tests' buffer with drawn groups)


class CursorLoader:
    """The loader interface the snapshot uses: a cursor with state_dict / load_state_dict."""

    def __init__(self) -> None:
        self.position = 0

    def next_batch(self, n: int) -> list[int]:
        out = list(range(self.position, self.position + n))
        self.position += n
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_single_process_agreement():
    agree_on_failure(None, torch.device("cpu"))  # nothing failed: no error
    with pytest.raises(StepFailure, match="ImageError: gone.png") as info:
        agree_on_failure("ImageError: gone.png", torch.device("cpu"))
    assert info.value.recoverable
    assert describe(KeyError("pair 7")) == "KeyError: 'pair 7'"


def test_snapshot_undoes_what_a_failed_step_changed():
    loader, buffer = CursorLoader(), varied_buffer()
    loader.next_batch(3)
    torch.manual_seed(5)
    snapshot = StepSnapshot.take(loader, {"ssb": buffer.snapshot()})
    expected_draw = buffer.snapshot()
    expected_random = torch.rand(4)
    # What a failing step does before it fails: takes data, draws from the SSB, uses the RNG.
    loader.next_batch(4)
    buffer.draw(2)
    torch.rand(10)
    assert loader.position == 7 and buffer.draw_counter != expected_draw[0]
    snapshot.restore(loader)
    buffer.restore_snapshot(snapshot.extra["ssb"])
    assert loader.position == 3
    assert torch.equal(torch.rand(4), expected_random)  # the RNG continues as if nothing happened
    assert buffer.draw_counter == expected_draw[0] and buffer.snapshot()[2] == expected_draw[2]
    # The next draw is the one the uninterrupted run makes.
    again = varied_buffer()
    assert [g.uid for g in buffer.draw(2).groups] == [g.uid for g in again.draw(2).groups]
    assert np.array_equal([buffer.times_drawn(g.uid) for g in buffer.groups],
                          [again.times_drawn(g.uid) for g in again.groups])
