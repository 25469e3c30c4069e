"""Plots of the TensorBoard scalars of training runs, as PNG files.

``tools/plot_run.py`` is the command line; shell scripts can also call these directly:

    python -c "from megatron_r1v.plotting import load_scalars, plot_runs; \\
               plot_runs({'run': load_scalars('runs/a')}, None, 'a.png')"

A run folder may hold several event files (one per session of a resumed run, or in
sub-folders); their scalars are merged per tag and step, and when two files hold the
same tag and step the point with the later wall time wins, as the resumed session
rewrote it.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing depends
on, or changes, the process-wide backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from megatron_r1v.atomic_dir import atomic_file

# step values of one tag, sorted by step, and the matching values
Series = tuple[list[int], list[float]]
Scalars = dict[str, Series]

# The prefix TensorBoard writers give every event file (events.out.tfevents.<time>.<host>...).
EVENT_FILE_MARK = "tfevents"
# Subplots per row of the grid.
MAX_COLUMNS = 3


def find_event_files(run_dir: Union[str, Path]) -> list[Path]:
    """Every event file under ``run_dir`` (recursively), sorted by path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such directory")
    files = sorted(p for p in run_dir.rglob(f"*{EVENT_FILE_MARK}*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files (events.out.{EVENT_FILE_MARK}.*) under it")
    return files


def load_scalars(run_dir: Union[str, Path]) -> Scalars:
    """``{tag: (steps, values)}`` of all event files under ``run_dir``, sorted by step.

    One point per tag and step: the one with the latest wall time (ties: the file later
    in path order, then the later event in its file).
    """
    # Imported here: tensorboard's import is slow and only this function needs it.
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    latest: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall_time, value)
    for path in find_event_files(run_dir):
        # scalars=0 keeps every point (the default samples 10,000); no purging, so points
        # of a restarted session are merged by the wall-time rule below, not dropped.
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0}, purge_orphaned_data=False)
        accumulator.Reload()
        for tag in accumulator.Tags()[SCALARS]:
            points = latest.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                held = points.get(event.step)
                if held is None or event.wall_time >= held[0]:
                    points[event.step] = (event.wall_time, float(event.value))
    return {tag: ([step for step in sorted(points)], [points[step][1] for step in sorted(points)])
            for tag, points in sorted(latest.items())}


def all_tags(runs: Mapping[str, Scalars]) -> list[str]:
    """The tags of any run, sorted."""
    return sorted({tag for scalars in runs.values() for tag in scalars})


def plot_runs(
    runs: Mapping[str, Scalars],
    tags: Optional[Sequence[str]],
    out: Union[str, Path],
    title: Optional[str] = None,
) -> Path:
    """Draws one subplot per tag (``None``: all tags, sorted), the runs overlaid, to ``out``.

    ``runs`` maps a legend label to the scalars of one run (:func:`load_scalars`). A tag
    missing from every run is a ValueError naming the available tags; a tag missing from
    some runs is drawn for the others. The PNG is written to a temporary file beside
    ``out`` and moved into place, so ``out`` is never half-written. Returns ``out``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("no runs to plot")
    available = all_tags(runs)
    if tags is None:
        tags = available
    else:
        absent = [tag for tag in tags if tag not in available]
        if absent:
            raise ValueError(f"tag(s) {', '.join(repr(t) for t in absent)} in no run; available: "
                             f"{', '.join(available) if available else 'none'}")
    if not tags:
        raise ValueError(f"no scalar tags to plot (runs: {', '.join(runs)})")
    columns = min(MAX_COLUMNS, len(tags))
    rows = math.ceil(len(tags) / columns)
    figure = Figure(figsize=(5.0 * columns, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, tag in enumerate(tags):
        axes = figure.add_subplot(rows, columns, index + 1)
        for label, scalars in runs.items():
            if tag not in scalars:
                continue
            steps, values = scalars[tag]
            # Markers make short series (and single points, which draw no line) visible.
            axes.plot(steps, values, label=label, linewidth=1.2, marker="." if len(steps) < 30 else None)
        axes.set_title(tag, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        if len(runs) > 1:
            axes.legend(fontsize=8)
    if title:
        figure.suptitle(title)

    with atomic_file(out, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    return Path(out)


def plot_histograms(
    series: Mapping[str, Sequence[float]],
    out: Union[str, Path],
    *,
    xlabel: str,
    ylabel: str = "count",
    title: Optional[str] = None,
    marks: Optional[Mapping[str, float]] = None,
    bins: int = 30,
) -> Path:
    """Overlaid histograms of ``series`` (legend label -> values) on shared bins, to ``out``.

    Each label shows its number of values; ``marks`` draws a dashed vertical line per
    entry (label -> x, e.g. a threshold). Series may be empty (an axes with no bars says
    so). Written like :func:`plot_runs`: never half-written. Returns ``out``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = [float(v) for vs in series.values() for v in vs]
    figure = Figure(figsize=(6.0, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if values:
        low, high = min(values), max(values)
        # One shared set of edges, so the series' bars line up; a single value gets a unit-wide bin.
        width = (high - low) / bins if high > low else 1.0 / bins
        edges = [low - (0.5 if high == low else 0.0) + width * i for i in range(bins + 1)]
        for label, vs in series.items():
            axes.hist(list(vs), bins=edges, alpha=0.6, label=f"{label} ({len(vs)})")
    else:
        axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes)
    for label, x in (marks or {}).items():
        axes.axvline(x, color="black", linestyle="--", linewidth=1.0, label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title, fontsize=10)
    if values or marks:
        axes.legend(fontsize=8)
    with atomic_file(out, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    return Path(out)
