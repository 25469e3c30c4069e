"""Packed rows are attended sample by sample (varlen attention over cu_seqlens): changing one
sample's tokens and images leaves every other sample's logits in the row bit-identical.

A dense mask or attention leaking across samples changes the other samples' logits (a
model whose samples see each other fails the ``identical`` checks); the changed sample's
own logits must move, so a model that ignored its input would fail too.
"""

import json

import pytest
import torch

WORKER = "tests/distributed/workers/packed_isolation_worker.py"


def run_isolation(torchrun, internvl, tmp_path, tp: int, pp: int, *extra: str) -> dict:
    torchrun(WORKER, tp * pp, ["--hf-file", str(internvl["weights"]), "--tp", str(tp), "--pp", str(pp),
                               "--out", str(tmp_path), *extra])
    return json.loads((tmp_path / "result.json").read_text())


def assert_isolated(result: dict) -> None:
    changed = [s for s in result["segments"] if s["sample"] == result["changed"]]
    others = [s for s in result["segments"] if s["sample"] != result["changed"]]
    assert len(changed) == 1 and len(others) == 3 and result["padding_tokens"] > 0
    assert not changed[0]["identical"] and changed[0]["max_abs_diff"] > 1e-3
    assert all(s["identical"] for s in others), others
    assert result["padding_identical"]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_other_samples_bit_identical_local_backend(tp, pp, torchrun, internvl, tmp_path):
    assert_isolated(run_isolation(torchrun, internvl, tmp_path, tp, pp))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine's varlen attention needs CUDA")
def test_other_samples_bit_identical_te_backend(torchrun, internvl, tmp_path):
    pytest.importorskip("transformer_engine")
    assert_isolated(run_isolation(torchrun, internvl, tmp_path, 1, 1, "--backend", "te", "--dtype", "bf16"))
