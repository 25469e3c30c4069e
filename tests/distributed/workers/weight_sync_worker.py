"""torchrun worker for the rollout weight-sync tests (tiny-r1v, CPU, gloo, fp32).

The trainer is an adapter-only (freeze "adapter") Megatron model stage loaded from the
session's transformers weights; the engine on global rank 0 starts from other random
weights. Steps: check (must fail) -> full sync -> check + independent comparison with
``gather_hf_tensors`` -> one real optimizer step -> check (must fail: stale adapter) ->
trainable-only sync -> check + comparison. Rank 0 writes the numbers to report.json;
the test asserts them.
"""

import argparse
import json
import os
from dataclasses import asdict

import torch
import torch.distributed as dist
from lm_steps import lm_train_step  # the workers folder (the script's own)
from safetensors import safe_open

from megatron_r1v.checkpoint.hf_layouts import convert_layout
from megatron_r1v.checkpoint.weights import gather_hf_tensors, load_hf_weights
from megatron_r1v.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_r1v.models.r1v.hf_mapping import SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.platform import destroy_distributed, init_distributed
from megatron_r1v.rollout.hf_engine import HFRolloutEngine
from megatron_r1v.rollout.weight_sync import WeightsOutOfSync, WeightSync
from megatron_r1v.trainer.schedule import attach_ddp_hooks, causal_lm_microbatch
from megatron_r1v.trainer.setup import build_model_stage, build_optimizer, wrap_ddp


class RecordingEngine(HFRolloutEngine):
    """Remembers the names and sizes of every update_weights call (one call per bucket)."""

    def __init__(self, inner: HFRolloutEngine) -> None:
        super().__init__(inner.model, device=inner.device)
        self.calls: list[list[tuple[str, int]]] = []

    def update_weights(self, named_tensors):
        items = list(named_tensors)
        self.calls.append([(name, t.numel() * t.element_size()) for name, t in items])
        super().update_weights(items)


def check(sync: WeightSync, engine) -> dict:
    """check_in_sync as data: the diff, or the error's tensor name and diff."""
    try:
        return {"ok": True, "max_abs_diff": sync.check_in_sync(engine)}
    except WeightsOutOfSync as err:
        return {"ok": False, "name": err.name, "max_abs_diff": err.max_abs_diff, "message": str(err)}


def compare(engine, reference: dict) -> dict:
    """Independent of WeightSync: engine weights vs gather_hf_tensors, tensor by tensor."""
    weights = {k: v for k, v in engine.named_weights()}
    unequal = sorted(n for n in reference if n in weights and not torch.equal(weights[n], reference[n]))
    return {"engine_only": sorted(set(weights) - set(reference)), "trainer_only": sorted(set(reference) - set(weights)),
            "unequal": unequal, "compared": len(set(weights) & set(reference))}


class DictEngine:
    """Receives weight-sync buckets under whatever names they carry."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def update_weights(self, named_tensors) -> None:
        for name, tensor in named_tensors:
            assert name not in self.tensors, f"{name} sent twice"
            self.tensors[name] = tensor.clone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-file", required=True)
    parser.add_argument("--data-file", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)  # DP = world size / (TP * PP)
    parser.add_argument("--bucket-bytes", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ctx = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    arch = get_preset("tiny-r1v")
    stage = build_model_stage(arch, ctx, ModelConfig(preset="tiny-r1v", backend="local", freeze="adapter"),
                              layout=TRANSFORMERS_LAYOUT)
    with safe_open(args.hf_file, framework="pt") as reader:
        load_hf_weights(stage.model, stage.stage_maps, stage.shard_spec, ctx, reader.get_tensor)
    ddp = wrap_ddp(stage.model, stage.config)
    optimizer = build_optimizer([ddp], OptimizerConfig(lr=1e-2), "fp32")
    attach_ddp_hooks(ddp, optimizer)

    engine = RecordingEngine(HFRolloutEngine.from_arch(arch, seed=99)) if ctx.rank == 0 else None
    sync = WeightSync(arch, ctx, [ddp], bucket_bytes=args.bucket_bytes, shard_spec=stage.shard_spec,
                      backend=stage.backend)
    report: dict = {"before": check(sync, engine)}

    first = sync.sync(engine)
    report["first_calls"] = list(engine.calls) if engine else None
    report["first_check"] = check(sync, engine)
    before_step = gather_hf_tensors(ddp, stage.stage_maps, stage.shard_spec, ctx)
    if ctx.rank == 0:
        report["first_compare"] = compare(engine, before_step)
        report["engine_bytes"] = {n: t.numel() * t.element_size() for n, t in engine.named_weights()}

    # One adapter-only training step on the image batch (the text batch gives the adapter no gradient).
    batch = torch.load(args.data_file)[0]
    mb = causal_lm_microbatch(batch["input_ids"], batch["labels"])
    mb["pixel_values"] = batch["pixel_values"]
    lm_train_step(ddp, optimizer, [mb], ctx)
    report["stale"] = check(sync, engine)

    calls_before = len(engine.calls) if engine else 0
    second = sync.sync(engine)
    report["second_calls"] = engine.calls[calls_before:] if engine else None
    report["second_check"] = check(sync, engine)
    after_step = gather_hf_tensors(ddp, stage.stage_maps, stage.shard_spec, ctx)
    if ctx.rank == 0:
        report["second_compare"] = compare(engine, after_step)
        report["changed_by_step"] = sorted(n for n in after_step if not torch.equal(after_step[n], before_step[n]))

    # The SGLang engine's names: a sync in the released (skywork) layout must carry exactly
    # the tensors that converting the engine's (transformers-named, now in sync) weights
    # into that layout gives.
    skywork_sync = WeightSync(arch, ctx, [ddp], bucket_bytes=args.bucket_bytes, shard_spec=stage.shard_spec,
                              backend=stage.backend, layout=SKYWORK_LAYOUT)
    received = DictEngine() if ctx.rank == 0 else None
    skywork_sync.sync(received)
    if ctx.rank == 0:
        held = dict(engine.named_weights())
        expected = dict(convert_layout(held.__getitem__, arch, TRANSFORMERS_LAYOUT, SKYWORK_LAYOUT))
        report["skywork_names"] = sorted(received.tensors)
        report["skywork_mismatch"] = sorted(n for n in set(expected) | set(received.tensors)
                                            if n not in expected or n not in received.tensors
                                            or not torch.equal(expected[n], received.tensors[n]))

    stats = [None] * ctx.world_size
    dist.all_gather_object(stats, {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank,
                                   "dp_rank": ctx.dp_rank, "first": asdict(first), "second": asdict(second)})
    if ctx.rank == 0:
        report["stats"] = stats
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
