"""TensorBoard scalar plots: megatron_r1v.plotting and the tools/plot_run.py command line."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from megatron_r1v.plotting import find_event_files, load_scalars, plot_runs

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "plot_run.py"


def write_session(log_dir: Path, points: dict[str, list[tuple[int, float, float]]]) -> None:
    """One writer session: ``{tag: [(step, value, wall_time), ...]}`` (explicit wall times
    make "the later one wins" independent of the clock)."""
    writer = SummaryWriter(str(log_dir))
    for tag, rows in points.items():
        for step, value, wall_time in rows:
            writer.add_scalar(tag, value, step, walltime=wall_time)
    writer.close()


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    """Run a: two sessions, the second resumed at step 2 and written into a sub-folder whose
    files sort BEFORE the first session's, so file order alone would pick the wrong point.
    Run b: one session with a tag run a lacks."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    write_session(run_a, {"loss": [(0, 4.0, 100.0), (1, 3.0, 101.0), (2, 2.5, 102.0), (3, 2.25, 103.0)],
                          "reward/mean": [(0, 0.1, 100.0), (2, 0.3, 102.0)]})
    write_session(run_a / "0_resumed", {"loss": [(2, 2.0, 200.0), (3, 1.5, 201.0), (4, 1.0, 202.0)]})
    write_session(run_b, {"loss": [(0, 5.0, 10.0), (1, 4.5, 11.0)], "lr": [(0, 1e-3, 10.0), (1, 5e-4, 11.0)]})
    return run_a, run_b


def load_tool():
    spec = importlib.util.spec_from_file_location("plot_run_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_scalars_merges_sessions_later_wall_time_wins(runs):
    run_a, run_b = runs
    assert len(find_event_files(run_a)) == 2
    # float32 in the event files: these values are exact there.
    assert load_scalars(run_a) == {"loss": ([0, 1, 2, 3, 4], [4.0, 3.0, 2.0, 1.5, 1.0]),
                                   "reward/mean": ([0, 2], [pytest.approx(0.1), pytest.approx(0.3)])}
    assert load_scalars(run_b) == {"loss": ([0, 1], [5.0, 4.5]), "lr": ([0, 1], [pytest.approx(1e-3),
                                                                                  pytest.approx(5e-4)])}


def test_an_older_rewrite_in_a_later_file_does_not_win(tmp_path):
    run = tmp_path / "r"
    write_session(run / "a", {"x": [(5, 1.0, 500.0)]})
    write_session(run / "b", {"x": [(5, 2.0, 400.0)]})  # later in path order, earlier in time
    assert load_scalars(run) == {"x": ([5], [1.0])}


def test_plot_runs_writes_a_png(runs, tmp_path):
    run_a, run_b = runs
    out = plot_runs({"a": load_scalars(run_a), "b": load_scalars(run_b)}, None, tmp_path / "png" / "all.png",
                    title="two runs")
    assert out == tmp_path / "png" / "all.png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        # Tags loss, lr, reward/mean: one row of three subplots, wider than tall.
        assert image.width > image.height > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["all.png"]  # no temporary file left


def test_plot_runs_errors(runs, tmp_path):
    scalars = {"a": load_scalars(runs[0])}
    with pytest.raises(ValueError, match=r"^tag\(s\) 'lr', 'acc' in no run; available: loss, reward/mean$"):
        plot_runs(scalars, ["loss", "lr", "acc"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"^no runs to plot$"):
        plot_runs({}, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"^no scalar tags to plot \(runs: empty\)$"):
        plot_runs({"empty": {}}, None, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_load_scalars_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'gone'}: no such directory$"):
        load_scalars(tmp_path / "gone")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no events here")
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'empty'}: no TensorBoard event files "
                                                 rf"\(events\.out\.tfevents\.\*\) under it$"):
        load_scalars(tmp_path / "empty")


def test_cli_default_output_and_tags(runs, capsys):
    run_a, run_b = runs
    tool = load_tool()
    assert tool.main([str(run_a), str(run_b), "--labels", "first", "second", "--tags", "loss", "lr"]) == 0
    out = run_a / "scalars.png"
    assert capsys.readouterr().out == f"{out}\n"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 0


def test_cli_errors(runs, tmp_path, capsys):
    run_a, run_b = runs
    tool = load_tool()
    out = tmp_path / "x.png"
    assert tool.main([str(run_a), "--tags", "nope", "--out", str(out)]) == 1
    assert capsys.readouterr().err == "error: tag(s) 'nope' in no run; available: loss, reward/mean\n"
    (tmp_path / "empty").mkdir()
    assert tool.main([str(run_a), str(tmp_path / "empty"), "--out", str(out)]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'empty'}: no TensorBoard event files "
                                       f"(events.out.tfevents.*) under it\n")
    assert tool.main([str(run_a), str(run_b), "--labels", "only-one", "--out", str(out)]) == 1
    assert capsys.readouterr().err == "error: --labels: 1 label(s) for 2 RUN_DIR(s)\n"
    assert not out.exists()


def test_cli_as_a_script(runs, tmp_path):
    out = tmp_path / "plots" / "run.png"
    done = subprocess.run([sys.executable, str(TOOL), str(runs[0]), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{out}\n", "")
    assert out.stat().st_size > 0
    with Image.open(out) as image:
        image.verify()
