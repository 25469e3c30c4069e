"""The memory planner's per-rank parameter state against real model stages at TP 2, PP 2
and DP 2 (gloo, 2 ranks each): weights, fp32 main grads and Adam state, byte for byte.

The tiny InternViT has 3 heads, padded to 4 at TP 2, and the tiny vocabulary (251) is
padded to 1024 at every TP: both paddings are in the weights the planner must predict.
"""

import json

import pytest

from unit.test_plan_memory import WORKER, check_rank, tiny_config  # tests/ is on sys.path (tests/conftest.py)
from megatron_r1v.memory_plan import param_bytes

CASES = [
    {"preset": "tiny-r1v", "freeze": "adapter", "distributed_optimizer": False},
    {"preset": "tiny-r1v", "freeze": "all", "distributed_optimizer": True},
    {"preset": "tiny-r1v", "freeze": "adapter+llm", "distributed_optimizer": False},
]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_parameter_state_bytes_per_rank(tp, pp, torchrun, tmp_path):
    (tmp_path / "cases.json").write_text(json.dumps(CASES))
    torchrun(WORKER, 2, ["--tp", str(tp), "--pp", str(pp), "--cases", str(tmp_path / "cases.json"),
                         "--out", str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted((r["pp_rank"], r["tp_rank"], r["dp_rank"]) for r in ranks) == sorted(
        {(2, 1): [(0, 0, 0), (0, 1, 0)], (1, 2): [(0, 0, 0), (1, 0, 0)], (1, 1): [(0, 0, 0), (0, 0, 1)]}[(tp, pp)])
    for i, case in enumerate(CASES):
        for rank in ranks:
            check_rank(case, rank["cases"][i], rank, tp, pp)
        if case["distributed_optimizer"] and ranks[0]["dp"] > 1:
            # Each DP rank holds the Adam state of its share of the buckets; the shares add up to the whole.
            planned = param_bytes(tiny_config(case, tp, pp), 0, 0, ranks[0]["dp"]).optimizer
            assert sum(r["cases"][i]["optimizer_state_bytes"] for r in ranks) == planned * ranks[0]["dp"]
            assert all(r["cases"][i]["optimizer_state_bytes"] < planned * ranks[0]["dp"] for r in ranks)
