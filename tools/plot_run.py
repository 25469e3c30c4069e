"""Plots the TensorBoard scalars of one or more runs into a PNG, one subplot per tag.

    python tools/plot_run.py RUN_DIR [RUN_DIR ...] [--labels a b] [--tags t1 t2 ...] [--out PNG] [--title T]

Event files are found recursively under each RUN_DIR; several runs are overlaid with a
legend (labels default to the folders as given). Default tags: every tag found, sorted;
default output: the first RUN_DIR/scalars.png. Prints the PNG path; errors go to stderr
as ``error: ...`` with exit status 1. The work is done by ``megatron_r1v.plotting``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_r1v.plotting import load_scalars, plot_runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tools/plot_run.py", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="folders searched recursively for TensorBoard event files")
    parser.add_argument("--labels", nargs="+", default=None, help="legend label per RUN_DIR (default: the paths)")
    parser.add_argument("--tags", nargs="+", default=None, help="scalar tags to plot (default: all, sorted)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/scalars.png)")
    parser.add_argument("--title", default=None, help="title over the grid")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    labels = args.labels if args.labels is not None else [str(d) for d in args.run_dirs]
    try:
        if len(labels) != len(args.run_dirs):
            raise ValueError(f"--labels: {len(labels)} label(s) for {len(args.run_dirs)} RUN_DIR(s)")
        if len(set(labels)) != len(labels):
            raise ValueError(f"--labels: repeated label(s) {sorted({x for x in labels if labels.count(x) > 1})}")
        runs = {label: load_scalars(run_dir) for label, run_dir in zip(labels, args.run_dirs)}
        out = args.out if args.out is not None else args.run_dirs[0] / "scalars.png"
        plot_runs(runs, args.tags, out, title=args.title)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
