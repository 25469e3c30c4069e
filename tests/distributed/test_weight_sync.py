"""Rollout weight sync: Megatron (TP=2 or PP=2, gloo) -> HFRolloutEngine on global rank 0.

Exact equality is required: the sync only moves and re-lays-out fp32 tensors (no
arithmetic), so every engine weight must equal the trainer's bit for bit.
"""

import json

import pytest

WORKER = "tests/distributed/workers/weight_sync_worker.py"
ADAPTER = "model.multi_modal_projector."
# Small enough that the ~0.8 MB tiny model needs dozens of buckets, and smaller than the
# embedding and lm_head (251 x 64 fp32 = 64 KiB), which must then travel alone.
BUCKET_BYTES = 16 << 10
# tiny-r1v decoder layers 2-3 (12 HF tensors each), final norm and lm_head: stage 1 of PP=2.
STAGE1_TENSORS = 2 * 12 + 2


# World size 2 each: TP=2, PP=2, and DP=2 (replica 1 holds no engine and stays out).
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)])
def test_weight_sync_is_exact_and_sends_only_the_adapter_after_the_first(tp, pp, tmp_path, internvl, torchrun):
    torchrun(WORKER, 2, ["--hf-file", str(internvl["weights"]), "--data-file", str(internvl["batches"]),
                               "--tp", str(tp), "--pp", str(pp), "--bucket-bytes", str(BUCKET_BYTES),
                               "--out", str(tmp_path)])
    r = json.loads((tmp_path / "report.json").read_text())
    sizes = r["engine_bytes"]
    # SGLang's layout (released InternVL-chat names: fused vision qkv, language_model.*).
    assert r["skywork_mismatch"] == [] and len(r["skywork_names"]) > 50
    assert "mlp1.0.weight" in r["skywork_names"] and "language_model.lm_head.weight" in r["skywork_names"]
    adapter = {n for n in sizes if n.startswith(ADAPTER)}
    assert len(sizes) > 50 and len(adapter) == 6

    # A fresh engine (other random weights) is caught, and not as a coincidence of one tensor.
    assert not r["before"]["ok"] and r["before"]["max_abs_diff"] > 0.1, r["before"]

    # First sync: every tensor, once, in buckets of at most BUCKET_BYTES unless alone.
    first = r["stats"][0]["first"]
    assert first["full"] and first["tensors"] == len(sizes) and first["bytes"] == sum(sizes.values())
    sent = [name for call in r["first_calls"] for name, _ in call]
    assert sorted(sent) == sorted(sizes)
    for call in r["first_calls"]:
        assert len(call) == 1 or sum(b for _, b in call) <= BUCKET_BYTES, call
    assert first["buckets"] == len(r["first_calls"]) >= sum(sizes.values()) // BUCKET_BYTES
    assert r["first_check"] == {"ok": True, "max_abs_diff": 0.0}
    cmp = r["first_compare"]
    assert cmp["compared"] == len(sizes) and not (cmp["engine_only"] or cmp["trainer_only"] or cmp["unequal"]), cmp

    # The optimizer step moved exactly the adapter; the engine is now stale there.
    assert set(r["changed_by_step"]) == adapter
    assert not r["stale"]["ok"] and r["stale"]["name"].startswith(ADAPTER) and r["stale"]["max_abs_diff"] > 0

    # Second sync: the adapter alone, and everything equal again.
    second = r["stats"][0]["second"]
    assert not second["full"]
    assert second["tensors"] == 6 and second["bytes"] == sum(sizes[n] for n in adapter)
    assert {name for call in r["second_calls"] for name, _ in call} == adapter
    assert r["second_check"] == {"ok": True, "max_abs_diff": 0.0}
    cmp = r["second_compare"]
    assert cmp["compared"] == len(sizes) and not (cmp["engine_only"] or cmp["trainer_only"] or cmp["unequal"]), cmp

    others = r["stats"][1:]
    assert len(others) == 1
    other = others[0]
    if pp == 2:  # stage 1's first TP rank sent its stage point to point, then nothing (no adapter there).
        assert other["pp_rank"] == 1 and other["first"]["tensors"] == STAGE1_TENSORS
        assert other["first"]["buckets"] >= 2 and other["second"]["tensors"] == 0
    elif tp == 2:  # TP rank 1 only took part in the all-gathers.
        assert other["tp_rank"] == 1 and other["first"]["tensors"] == other["second"]["tensors"] == 0
    else:  # the second data-parallel replica neither gathers nor sends.
        assert other["dp_rank"] == 1 and other["first"]["tensors"] == other["second"]["tensors"] == 0
