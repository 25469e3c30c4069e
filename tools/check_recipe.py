"""Checks a cluster recipe on one CPU machine: config, the real model stage of every
pipeline rank of the N-GPU job (built on the meta device), and the memory plan.

    python tools/check_recipe.py --config examples/configs/r1v2_38b_grpo.yaml --gpus 64
    {"config": ..., "gpus": 64, "stages": [{"pp_rank": 0, "params": ..., "planned_params": ..., ...}],
     "peak_gb": 63.7, "fits": true, "ok": true}

For each pipeline stage, the stage of its first TP rank is built as that rank of the job
would build it (``megatron_r1v/recipe_check.py``: fake process group, meta device) and its
parameter counts are compared with ``memory_plan.param_bytes``. Exit status 0 when every
stage builds, the counts agree and the plan fits; 1 otherwise; 2 on a bad config.
Each stage is built in a child process: the fake process group is process-global.
"""

import argparse
import json
import subprocess
import sys


def _stage_counts(config: str, overrides: list[str], gpus: int, rank: int) -> dict:
    sets = [arg for override in overrides for arg in ("--set", override)]
    proc = subprocess.run([sys.executable, "-m", "megatron_r1v.recipe_check", "--config", config, *sets,
                           "--gpus", str(gpus), "--rank", str(rank)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"building the stage of rank {rank} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0)
    args = parser.parse_args(argv)

    from megatron_r1v.config import load_config
    from megatron_r1v.memory_plan import param_bytes, plan_memory

    try:
        cfg = load_config(args.config, args.overrides)
        plan = plan_memory(cfg, args.gpus, args.gpu_mem_gb)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    p = cfg.parallel
    stages = []
    for pp_rank in range(p.pp):
        # Megatron's rank order is tp-cp-dp-pp: pipeline stage k starts at rank k * (world / pp).
        built = _stage_counts(args.config, args.overrides, args.gpus, pp_rank * (args.gpus // p.pp))
        assert built["pp_rank"] == pp_rank and built["tp_rank"] == 0, built
        planned = param_bytes(cfg, pp_rank, 0, args.gpus // (p.tp * p.pp * p.cp))
        stages.append({"pp_rank": pp_rank, "params": built["params"], "planned_params": planned.numel,
                       "trainable": built["trainable"], "planned_trainable": planned.trainable_numel})
    counts_agree = all(s["params"] == s["planned_params"] and s["trainable"] == s["planned_trainable"]
                       for s in stages)
    ok = counts_agree and plan.fits
    print(json.dumps({"config": args.config, "gpus": args.gpus, "stages": stages, "counts_agree": counts_agree,
                      "peak_gb": round(plan.peak_gb, 2), "fits": plan.fits, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
