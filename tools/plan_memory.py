"""Per-GPU memory plan of a run config: does it fit, and what to change if it does not.

    python tools/plan_memory.py --config examples/configs/r1v2_38b_mpo.yaml --gpus 64 [--gpu-mem-gb 80]
        [--set model.recompute_granularity=full ...] [--tiles-per-microbatch N] [--json]

Prints a table (per pipeline stage: weights, gradients, optimizer, activations by part;
per phase: training, rollout; the peak; fits; advice) or, with --json, the plan as one
JSON object. The model behind the numbers is documented in megatron_r1v/memory_plan.py.
Exit status: 0 when it fits, 1 when it does not, 2 on bad input (a config error, or a
GPU count that parallel.tp*pp*cp does not divide).
"""

import argparse
import dataclasses
import json
import sys


def _table(plan) -> str:
    gb = lambda x: f"{x:8.2f}"  # noqa: E731
    lines = [
        f"{plan.preset} {plan.stage}: {plan.gpus} GPUs x {plan.gpu_mem_gb:g} GB = tp {plan.tp} x pp {plan.pp} x "
        f"cp {plan.cp} x dp {plan.dp}; micro-batch {plan.micro_batch_tokens} tokens"
        + (f", {plan.tiles_per_microbatch} tiles" if plan.tiles_per_microbatch else ""),
        "",
        f"{'GB per GPU':28s}" + "".join(f"{'stage ' + str(s.pp_rank):>10s}" for s in plan.stages),
    ]
    rows = [("weights", "weights_gb"), ("gradients (fp32 main_grad)", "grads_gb"), ("optimizer (Adam)", "optimizer_gb"),
            ("kl reference copy", "reference_gb"), ("fp8 weight cache", "fp8_cache_gb"),
            ("activations", "activations_gb")]
    for label, key in rows:
        values = [getattr(s, key) for s in plan.stages]
        if key in ("reference_gb", "fp8_cache_gb") and not any(values):
            continue
        lines.append(f"{label:28s}" + "".join(f"  {gb(v)}" for v in values))
    parts = sorted({p for s in plan.stages for p in s.activation_parts_gb})
    for part in parts:
        values = [s.activation_parts_gb.get(part, 0.0) for s in plan.stages]
        lines.append(f"{'  ' + part:28s}" + "".join(f"  {gb(v)}" for v in values))
    lines.append(f"{'micro-batches in flight':28s}" + "".join(f"  {s.in_flight:8d}" for s in plan.stages))
    lines.append(f"{'training phase':28s}" + "".join(f"  {gb(s.training_gb)}" for s in plan.stages))
    if plan.rollout is not None:
        lines.append(f"{'rollout phase':28s}" + "".join(f"  {gb(s.rollout_gb)}" for s in plan.stages))
        r = plan.rollout
        lines += [
            "",
            f"rollout engine {r.engine}: weights {r.weights_gb:.2f} GB, KV cache {r.kv_cache_gb:.2f} GB = "
            f"{r.kv_tokens} tokens at {r.kv_bytes_per_token} B/token (static pool {r.static_gb:.2f} GB of "
            f"{r.free_at_start_gb:.2f} GB free at its start, "
            f"runtime {r.runtime_gb:.2f} GB, released {r.released_gb:.2f} GB, weight sync {r.sync_gb:.2f} GB)",
            f"  {r.sequences_per_engine} sequences x {r.tokens_per_sequence} tokens per engine: "
            f"{r.concurrency} at once, {r.waves} waves",
        ]
    lines += [
        "",
        f"reserve (CUDA context, NCCL, fragmentation): {plan.reserve_gb:.2f} GB, included in the phases",
        f"training phase {plan.training_phase_gb:.2f} GB, rollout phase {plan.rollout_phase_gb:.2f} GB",
        f"peak {plan.peak_gb:.2f} GB of {plan.gpu_mem_gb:g} GB (stage {plan.worst_stage}): "
        + ("fits" if plan.fits else "DOES NOT FIT"),
    ]
    lines += [f"problem: {p}" for p in plan.problems]
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"advice: {a}" for a in plan.advice]
    return "\n".join(lines)


def main(argv=None) -> int:
    from megatron_r1v.config import add_config_args, load_config
    from megatron_r1v.memory_plan import plan_memory

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the job (world size)")
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU in GB (2^30 bytes)")
    parser.add_argument("--tiles-per-microbatch", type=int, default=None,
                        help="image tiles per micro-batch (default: one image of data.max_tiles+1 tiles per "
                             "train.seq_length tokens)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        if args.gpu_mem_gb <= 0:
            raise ValueError(f"--gpu-mem-gb must be > 0, got {args.gpu_mem_gb}")
        if args.tiles_per_microbatch is not None and args.tiles_per_microbatch < 0:
            raise ValueError(f"--tiles-per-microbatch must be >= 0, got {args.tiles_per_microbatch}")
        config = load_config(args.config, args.overrides)
        plan = plan_memory(config, args.gpus, args.gpu_mem_gb, tiles_per_microbatch=args.tiles_per_microbatch)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dataclasses.asdict(plan), indent=1))
    else:
        print(_table(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
