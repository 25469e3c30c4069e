"""Predicted step time of a run config on N GPUs: per phase, tokens/s/GPU, MFU.

    python tools/plan_step_time.py --config examples/configs/r1v2_38b_grpo.yaml --gpus 64
        [--gpu h100-sxm|h200|h20|a100-sxm] [--framework megatron-te|fsdp-hf] [--json] [--calibration gpu_check.json]
        [--set efficiency.decode_bw=0.5] [--set assume.mean_response_frac=0.3] [--set rollout.n_samples=16]
    python tools/plan_step_time.py --config ... --gpus 64 --sensitivity [--out docs/step_time_sensitivity.png]
    python tools/plan_step_time.py --validate [--json]

A model, not a measurement: the equations, the hardware table with its sources, the
efficiency factors and the validation against published runs are in docs/step_time.md
(megatron_r1v/step_time/). ``--framework`` picks the training stack's efficiency profile (the
default, megatron-te, is this project's); ``--set`` keys starting with ``efficiency.`` change a factor,
``assume.`` an assumption the recipe does not fix; every other key overrides the recipe.
``--calibration`` reads tools/gpu_check.sh's gpu_check.json (or a hand-written
{"efficiency": {...}} file) measured on the same kind of GPU; --set wins over it.
Exit status: 0, or 2 on bad input (a config error, an unknown factor, a GPU count that
parallel.tp*pp*cp does not divide).
"""

import argparse
import dataclasses
import json
import sys


def _split_overrides(items: list[str]) -> tuple[list[str], dict, dict]:
    config, eff, assume = [], {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        if key.startswith("efficiency."):
            eff[key.split(".", 1)[1]] = value
        elif key.startswith("assume."):
            assume[key.split(".", 1)[1]] = value
        else:
            config.append(item)
    return config, eff, assume


def _table(s) -> str:
    lines = [f"{s.name}: {s.gpus} x {s.gpu} (a model, not a measurement; docs/step_time.md)", "",
             f"{'phase':18s} {'seconds':>10s} {'share':>7s}"]
    for k, v in s.phases_s.items():
        lines.append(f"{k:18s} {v:10.2f} {100 * s.shares[k]:6.1f}%")
    lines += ["", f"step {s.step_s:.1f} s; {s.tokens_per_step:,.0f} tokens; {s.tokens_per_s_per_gpu:.0f} tokens/s/GPU; "
              f"training-phase MFU {100 * s.train_mfu:.1f}%, over the step {100 * s.step_mfu:.1f}%"]
    if s.concurrency is not None:
        lines.append(f"rollout: {s.sequences_per_engine:.0f} sequences per engine, {s.concurrency} decoded at once")
    lines += [f"assumed {k} = {v}" for k, v in s.assumptions.items()]
    return "\n".join(lines)


def _sensitivity_table(title: str, rows) -> str:
    lines = [f"{title}", f"{'knob':22s} {'value':40s} {'step s':>8s} {'tok/s/GPU':>10s} {'MFU':>6s}"]
    for r in rows:
        if r.step_s is None:
            lines.append(f"{r.knob:22s} {r.value:40s} {r.note}")
        else:
            lines.append(f"{r.knob:22s} {r.value:40s} {r.step_s:8.1f} {r.tokens_per_s_per_gpu:10.0f} "
                         f"{100 * r.train_mfu:5.1f}% {r.note}")
    return "\n".join(lines)


def _validate(args) -> int:
    from megatron_r1v.step_time.validation import validation_table

    rows = validation_table()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        return 0
    for r in rows:
        print(f"{r.name[:70]:70s} {r.framework:11s} {r.metric:20s} model {r.predicted:10.3f} "
              f"published {r.published:10.3f} {100 * r.error:+6.0f}% {'ok' if r.within else 'OUTSIDE'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from megatron_r1v.step_time import GPUS
    from megatron_r1v.step_time.hardware import FRAMEWORKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=[],
                        help="YAML recipe (examples/configs/*.yaml); with --sensitivity, repeatable (one panel each)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, efficiency.<factor>=x or assume.<name>=x (repeatable)")
    parser.add_argument("--gpus", type=int, help="GPUs of the job (world size)")
    parser.add_argument("--gpu", default="h100-sxm", choices=sorted(GPUS), help="GPU kind (hardware table)")
    parser.add_argument("--framework", default="megatron-te", choices=sorted(FRAMEWORKS),
                        help="training stack's efficiency profile (docs/step_time.md); default: this project's")
    parser.add_argument("--calibration", help="gpu_check.json (tools/gpu_check.sh) measured on this GPU kind")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--sensitivity", action="store_true", help="the main knobs' effect, as a table (+ --out PNG)")
    parser.add_argument("--out", help="with --sensitivity: write the PNG here")
    parser.add_argument("--validate", action="store_true", help="the published runs next to the model")
    return parser


def main(argv=None) -> int:
    from megatron_r1v.config import load_config
    from megatron_r1v.step_time import Assumptions, calibrate, gpu_spec, plan_step_time
    from megatron_r1v.step_time.hardware import framework_efficiency
    from megatron_r1v.step_time.sensitivity import plot_sensitivity, sensitivity

    args = _parser().parse_args(argv)
    if args.validate:
        return _validate(args)
    try:
        if not args.config or not args.gpus:
            raise ValueError("--config and --gpus are required (or --validate)")
        if len(args.config) > 1 and not args.sensitivity:
            raise ValueError("give one --config (several only with --sensitivity)")
        overrides, eff_set, assume_set = _split_overrides(args.overrides)
        eff = framework_efficiency(args.framework)
        if args.calibration:
            eff, _ = calibrate(args.calibration, gpu_spec(args.gpu), eff)
        eff, assume = eff.with_overrides(eff_set), Assumptions().with_overrides(assume_set)
        configs = {path: load_config(path, overrides) for path in args.config}
        if args.sensitivity:
            tables = {f"{path} on {args.gpus} x {args.gpu}": sensitivity(cfg, args.gpus, args.gpu, eff, assume)
                      for path, cfg in configs.items()}
        else:
            plan = plan_step_time(configs[args.config[0]], args.gpus, args.gpu, eff, assume)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.sensitivity:
        if args.out:
            plot_sensitivity(tables, args.out)
        if args.json:
            print(json.dumps({t: [dataclasses.asdict(r) for r in rows] for t, rows in tables.items()}, indent=1))
        else:
            print("\n\n".join(_sensitivity_table(t, rows) for t, rows in tables.items()))
        return 0
    print(json.dumps(dataclasses.asdict(plan), indent=1) if args.json else _table(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
