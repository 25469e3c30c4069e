"""Context parallelism across ranks.

- gloo (CPU): the gather of per-token outputs and the CP sums of per-sample terms, with their
  gradients, over plain process groups of 2 and 4 ranks (workers/context_parallel_worker.py).
- CUDA + Transformer Engine (2+ GPUs): the whole trainer path, the tiny R1V model's log-probs
  and logits of a packed row with images at cp=2 against cp=1 (workers/context_parallel_te_worker.py).
"""

import json

import pytest
import torch

WORKER = "tests/distributed/workers/context_parallel_worker.py"
TE_WORKER = "tests/distributed/workers/context_parallel_te_worker.py"


def test_gather_and_cp_sums_match_the_unsplit_row(torchrun, tmp_path):
    torchrun(WORKER, 4, ["--out", str(tmp_path)], timeout=180)
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result) == {"cp2", "cp4"}
    for diffs in result.values():
        assert diffs["logp"] < 1e-5 and diffs["grad"] < 1e-5 and diffs["seq"] < 1e-4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallelism runs TE's attention over 2 CUDA GPUs")
def test_te_context_parallel_matches_cp1(torchrun, internvl, tmp_path):
    pytest.importorskip("transformer_engine")
    args = ["--hf-file", str(internvl["weights"])]
    torchrun(TE_WORKER, 1, [*args, "--cp", "1", "--out", str(tmp_path / "cp1.pt")])
    torchrun(TE_WORKER, 2, [*args, "--cp", "2", "--out", str(tmp_path / "cp2.pt")])
    one, two = torch.load(tmp_path / "cp1.pt"), torch.load(tmp_path / "cp2.pt")
    # bf16 attention computed in another order: close, not equal.
    torch.testing.assert_close(two["logprobs"], one["logprobs"], atol=5e-2, rtol=0)
    torch.testing.assert_close(two["logits"], one["logits"], atol=1e-1, rtol=5e-2)
