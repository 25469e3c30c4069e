"""The 38B recipes of examples/configs, checked on CPU as the 64-GPU job would run them:
the config validates (TP/PP divide the preset), the model stage of each pipeline rank
builds on the meta device as that rank of the job (fake process group), its parameter
counts equal the memory planner's, and the plan fits in 80 GB (tools/check_recipe.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "check_recipe.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=REPO)


@pytest.mark.parametrize("stage,pp", [("mpo", 2), ("grpo", 1)])
def test_38b_recipe_builds_on_64_gpus_and_fits(stage, pp):
    proc = _check("--config", f"examples/configs/r1v2_38b_{stage}.yaml", "--gpus", "64")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["fits"] and result["counts_agree"] and result["peak_gb"] < 80
    stages = result["stages"]
    assert [s["pp_rank"] for s in stages] == list(range(pp))
    for s in stages:
        assert s["params"] == s["planned_params"] and s["trainable"] == s["planned_trainable"]
    # Both stages train the adapter only (the report's Table 4), on the first pipeline stage:
    # mlp1's TP shard. LayerNorm(12800) and the row-parallel fc2 bias (5120) are replicated;
    # fc1 (12800 -> 5120, bias) and fc2's weight (5120 x 5120) split over 8.
    replicated = 2 * 12800 + 5120
    assert stages[0]["trainable"] == (91_786_240 - replicated) // 8 + replicated == 11_500_160
    assert all(s["trainable"] == 0 for s in stages[1:])
    # 38.39B parameters over TP 8 (plus vocabulary padding and zero-padded vision heads):
    # the stages of one TP rank hold a little more than 1/8 of the model.
    total = sum(s["params"] for s in stages)
    assert 38.39e9 / 8 < total < 1.02 * 38.39e9 / 8


def test_recipe_check_rejects_layouts_that_do_not_divide():
    proc = _check("--config", "examples/configs/r1v2_38b_grpo.yaml", "--gpus", "60")
    assert proc.returncode == 2 and "60" in proc.stderr
    proc = _check("--config", "examples/configs/r1v2_38b_mpo.yaml", "--gpus", "64", "--set", "parallel.tp=3")
    assert proc.returncode == 2 and "parallel" in proc.stderr
