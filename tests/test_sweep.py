"""Tests for the batch-size sweep: a tiny end-to-end sweep (MLP on a few hundred subset images), resume,
censored cells, best-learning-rate selection against a hand-made table, smoothing/crossing against
hand computations, and argument errors."""

from __future__ import annotations

import contextlib
import csv
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import noisescale.sweep as sweep
from noisescale.app.cli import main
from noisescale.sweep import (
    SweepSettings,
    best_learning_rate_cells,
    first_crossing,
    fit_sweep,
    geometric_batch_sizes,
    learning_rate_grid,
    noise_scale_at_target,
    read_sweep_results,
    refine_learning_rate_grid,
    run_sweep,
    smooth_centered,
)
from noisescale.models import mlp
from noisescale.tradeoff import fit_tradeoff, with_interval


def small_mlp():
    """784 -> 32 -> 10: fast enough for a whole sweep in seconds (importable by the spawned workers)."""
    return mlp(hidden=(32,))


TINY = SweepSettings(
    target_metric="test_accuracy", target=0.65, model=f"{__name__}:small_mlp", train_examples=384,
    eval_examples=200, eval_every=4, smoothing_window=3, max_steps=120, seed=3,
)
BATCH_SIZES = [8, 16, 32]
# 1e-4 cannot reach 65 % in 120 steps: those cells are censored
LEARNING_RATES = [1e-4, 0.01, 0.03]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "cells.csv"
    return path, run_sweep(path, BATCH_SIZES, LEARNING_RATES, TINY, progress=False)


def test_tiny_sweep_rows_settings_and_outcomes(tiny_sweep):
    path, frame = tiny_sweep
    assert len(frame) == len(BATCH_SIZES) * len(LEARNING_RATES)
    assert sorted(zip(frame.batch_size, frame.learning_rate)) == [(b, lr) for b in BATCH_SIZES for lr in LEARNING_RATES]
    assert (frame["model"] == TINY.model).all() and (frame["target"] == TINY.target).all()
    censored = frame[frame.learning_rate == 1e-4]
    assert (censored.outcome == "censored").all() and censored.steps.isna().all() and censored.b_noise.isna().all()
    assert (censored.steps_trained >= TINY.max_steps).all()
    reached = frame[frame.outcome == "reached"]
    assert len(reached) >= len(BATCH_SIZES)  # at least one learning rate per batch size reaches 65 %
    assert (reached.steps > 0).all() and (reached.steps <= TINY.max_steps).all()
    np.testing.assert_allclose(reached.examples, reached.steps * reached.batch_size)
    # the run stops (window - 1) / 2 evaluations after the evaluation where the smoothed curve crossed
    assert (reached.steps_trained - reached.steps <= 2 * TINY.eval_every).all()
    assert (reached.b_simple > 0).all() and (reached.b_simple_low <= reached.b_simple).all()
    assert np.isfinite(reached.b_noise).all()
    pd.testing.assert_frame_equal(read_sweep_results(path), frame)


def test_resume_trains_only_missing_cells_and_reproduces_them(tiny_sweep, tmp_path, monkeypatch):
    path, frame = tiny_sweep
    partial = tmp_path / "partial.csv"
    dropped = [(16, 0.01), (32, 0.03)]
    keep = ~pd.Series(list(zip(frame.batch_size, frame.learning_rate))).isin(dropped)
    frame[keep.to_numpy()].to_csv(partial, index=False)
    trained = []
    original = sweep.train_cell
    monkeypatch.setattr(sweep, "train_cell", lambda *args, **kw: trained.append(args[1:3]) or original(*args, **kw))
    resumed = run_sweep(partial, BATCH_SIZES, LEARNING_RATES, TINY, progress=False)
    assert sorted(trained) == dropped
    deterministic = [column for column in frame.columns if column != "seconds"]
    pd.testing.assert_frame_equal(resumed[deterministic], frame[deterministic])
    trained.clear()
    run_sweep(partial, BATCH_SIZES, LEARNING_RATES, TINY, progress=False)
    assert trained == []


def test_resume_refuses_a_file_of_other_settings(tiny_sweep):
    path, _ = tiny_sweep
    with pytest.raises(ValueError, match="target = 0.65.*0.7"):
        run_sweep(path, BATCH_SIZES, LEARNING_RATES, SweepSettings(**{**TINY.__dict__, "target": 0.7}),
                  progress=False)


def test_fit_uses_the_best_learning_rate_per_batch_size(tiny_sweep):
    _, frame = tiny_sweep
    best = best_learning_rate_cells(frame)
    for size, group in frame[frame.outcome == "reached"].groupby("batch_size"):
        assert best.set_index("batch_size").loc[size, "steps"] == group.steps.min()
    fit = fit_sweep(frame, n_bootstrap=50)
    reference = fit_tradeoff(best.batch_size.to_numpy(float), best.steps.to_numpy(float), n_bootstrap=50)
    assert fit.b_crit == reference.b_crit and fit.s_min == reference.s_min
    assert fit.b_crit_interval[0] <= fit.b_crit <= fit.b_crit_interval[1]


def test_noise_scale_plot_returns_its_figure_with_the_best_cells_and_the_b_crit_band(tiny_sweep, tmp_path):
    from matplotlib.figure import Figure

    from noisescale.app.plot import plot_noise_scale_vs_b_crit, save_figure

    _, frame = tiny_sweep
    fit = fit_sweep(frame, n_bootstrap=50)
    best = best_learning_rate_cells(frame)
    figure = plot_noise_scale_vs_b_crit(frame, fit)
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    for column, label in (("b_simple", "B_simple"), ("b_noise", "B_noise")):
        drawn = lines[f"{label} at the target (best lr)"]
        np.testing.assert_array_equal(drawn.get_xdata(), best["batch_size"])
        np.testing.assert_array_equal(drawn.get_ydata(), best[column])
    if 0 < fit.b_crit < np.inf:  # the tiny sweep's fit may sit at a limit (not resolved): then no B_crit line
        assert lines[f"fitted B_crit = {fit.b_crit:.3g}"].get_ydata()[0] == fit.b_crit
    else:
        assert not fit.resolved and not any(label.startswith("fitted B_crit") for label in lines)
    assert save_figure(figure, tmp_path / "noise_vs_b_crit.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_sweep_on_a_finished_file_trains_nothing_and_prints_the_fit(tiny_sweep, capsys, monkeypatch):
    path, frame = tiny_sweep
    monkeypatch.setattr(sweep, "train_cell", lambda *args, **kw: pytest.fail("a finished cell was retrained"))
    arguments = ["sweep", "--out", str(path), "--batch-sizes", "8,16,32", "--lr", "0.01", "--lr-reference-batch",
                 "8", "--lr-scaling", "constant", "--lr-factors", "0.01,1,3", "--max-lr", "1", "--target", "0.65",
                 "--model", TINY.model, "--train-examples", "384", "--eval-examples", "200", "--eval-every", "4",
                 "--max-steps", "120", "--seed", "3", "--no-progress"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    fit = fit_sweep(frame)
    assert with_interval("B_crit", fit.b_crit, fit.b_crit_interval) in printed


def test_parallel_jobs_give_the_same_cells(tmp_path):
    settings = SweepSettings(**{**TINY.__dict__, "max_steps": 40, "target": 0.5})
    sizes, rates = [16, 32], [0.03]
    serial = run_sweep(tmp_path / "serial.csv", sizes, rates, settings, progress=False)
    parallel = run_sweep(tmp_path / "parallel.csv", sizes, rates, settings, jobs=2, progress=False)
    assert list(parallel.outcome) == list(serial.outcome)
    np.testing.assert_allclose(parallel.steps, serial.steps, rtol=0.05)


def test_best_learning_rate_cells_against_a_hand_made_table():
    table = pd.DataFrame({
        "batch_size": [8, 8, 8, 16, 16, 16, 32, 32],
        "learning_rate": [0.01, 0.02, 0.04, 0.02, 0.04, 0.08, 0.04, 0.08],
        "outcome": ["reached", "reached", "diverged", "censored", "reached", "reached", "censored", "censored"],
        "steps": [300.0, 250.0, np.nan, np.nan, 140.0, 140.0, np.nan, np.nan],
    })
    best = best_learning_rate_cells(table)
    assert best.batch_size.tolist() == [8, 16]  # B = 32 never reached the target
    assert best.learning_rate.tolist() == [0.02, 0.04]  # B = 16: a tie goes to the smaller learning rate
    assert best.steps.tolist() == [250.0, 140.0]
    assert best.lr_at_grid_edge.tolist() == [False, False]
    assert best.cells_reached.tolist() == [2, 2]
    edge = best_learning_rate_cells(table.assign(steps=[200.0, 250.0, np.nan, np.nan, 140.0, 140.0, np.nan, np.nan]))
    assert edge.lr_at_grid_edge.tolist() == [True, False]


def test_refined_grid_steps_past_the_edge_where_the_best_learning_rate_sits():
    table = pd.DataFrame({
        "batch_size": [8, 8, 8, 16, 16, 16, 32, 32, 64],
        "learning_rate": [0.01, 0.02, 0.04, 0.02, 0.04, 0.08, 0.04, 0.08, 0.1],
        "outcome": ["reached", "reached", "diverged", "reached", "reached", "reached", "censored", "censored",
                    "reached"],
        "steps": [200.0, 250.0, np.nan, 300.0, 200.0, 150.0, np.nan, np.nan, 90.0],
    })
    grids = refine_learning_rate_grid(table)
    assert grids == {
        8: (0.005, 0.01, 0.02, 0.04),  # best at the smallest rate tried: one step down
        16: (0.02, 0.04, 0.08, 0.16),  # best at the largest: one step up
        32: (0.04, 0.08),  # never reached the target: nothing to go by
        64: (0.1,),  # a single rate tried has no edge
    }
    interior = table.assign(steps=[250.0, 200.0, np.nan, 300.0, 150.0, 200.0, np.nan, np.nan, 90.0])
    assert refine_learning_rate_grid(interior) == {8: (0.01, 0.02, 0.04), 16: (0.02, 0.04, 0.08), 32: (0.04, 0.08),
                                                    64: (0.1,)}
    assert refine_learning_rate_grid(table, factor=4)[16][-1] == 0.32
    with pytest.raises(ValueError, match="factor must be a finite number > 1"):
        refine_learning_rate_grid(table, factor=1)


def test_refined_grid_resumes_the_sweep_training_only_the_new_cells(tiny_sweep, tmp_path, monkeypatch):
    path, frame = tiny_sweep
    copy = tmp_path / "cells.csv"
    frame.to_csv(copy, index=False)
    grids = refine_learning_rate_grid(frame)
    new_cells = sorted((size, lr) for size, grid in grids.items() for lr in grid
                       if not ((frame.batch_size == size) & (frame.learning_rate == lr)).any())
    assert new_cells  # the grid [1e-4, 0.01, 0.03] is narrow: some best rate sits at 0.03, its top edge
    trained = []
    monkeypatch.setattr(sweep, "train_cell", lambda settings, size, lr, **kw: trained.append((size, lr)) or {
        **frame.iloc[0].to_dict(), "batch_size": size, "learning_rate": lr})
    refined = run_sweep(copy, BATCH_SIZES, grids, TINY, progress=False)
    assert sorted(trained) == new_cells and len(refined) == len(frame) + len(new_cells)


def test_noise_scale_at_target_takes_medians_over_finite_values_and_counts_the_rest():
    best = pd.DataFrame({"b_simple": [10.0, 30.0, 20.0, 40.0], "b_noise": [100.0, np.inf, 300.0, np.nan]})
    assert noise_scale_at_target(best) == {"b_simple": 25.0, "b_simple_unresolved": 0,
                                           "b_noise": 200.0, "b_noise_unresolved": 2}
    unresolved = noise_scale_at_target(best.assign(b_noise=np.inf))
    assert math.isnan(unresolved["b_noise"]) and unresolved["b_noise_unresolved"] == 4


def test_smoothing_and_crossing_against_hand_computation():
    values = [0.1, 0.5, 0.3, 0.7, 0.8, 0.9]
    naive = [np.nan] + [np.mean(values[i - 1: i + 2]) for i in range(1, 5)] + [np.nan]
    np.testing.assert_allclose(smooth_centered(values, 3), naive)
    steps = [0, 10, 20, 30, 40, 50]
    # smoothed: nan, 0.3, 0.5, 0.6, 0.8, nan -> 0.55 crossed between step 20 (0.5) and 30 (0.6)
    assert first_crossing(steps, values, 0.55, higher_is_better=True, window=3) == pytest.approx(25.0)
    assert first_crossing(steps, values, 0.3, higher_is_better=True, window=3) == 10.0
    assert math.isnan(first_crossing(steps, values, 0.95, higher_is_better=True, window=3))
    losses = [2.0, 1.0, 0.5]
    assert first_crossing([0, 5, 10], losses, 0.75, higher_is_better=False, window=1) == pytest.approx(7.5)
    for window in (2, 0, -1, 3.0):  # an even window failed inside numpy (could not broadcast), as train_to_target
        with pytest.raises(ValueError, match="window must be a positive odd int"):  # does not check its own
            first_crossing(steps, values, 0.55, higher_is_better=True, window=window)


def test_grids():
    assert geometric_batch_sizes(8, 64) == [8, 16, 32, 64]
    grid = learning_rate_grid([8, 16, 32, 64], 0.05, 16, factors=(0.5, 1.0), max_learning_rate=0.1)
    assert grid == {8: (0.0125, 0.025), 16: (0.025, 0.05), 32: (0.05, 0.1), 64: (0.05, 0.1)}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: run_sweep("unused.csv", [], [0.1], TINY), "batch_sizes is empty"),
        (lambda: run_sweep("unused.csv", [8, 16, 24], [0.1], TINY), "geometric"),
        (lambda: run_sweep("unused.csv", [32, 16, 8], [0.1], TINY), "increasing geometric"),
        (lambda: run_sweep("unused.csv", [1, 2, 4], [0.1], TINY), "ints >= 2"),
        (lambda: run_sweep("unused.csv", [8, 16], {8: [0.1]}, TINY), r"no grid for batch size\(s\) \[16\]"),
        (lambda: run_sweep("unused.csv", [8, 16], [0.1, -1.0], TINY), "positive and finite"),
        (lambda: run_sweep("unused.csv", [8, 16], [0.1], TINY, jobs=0), "jobs must be"),
        (lambda: SweepSettings(target_metric="train_loss"), "target_metric must be one of"),
        (lambda: SweepSettings(target=1.5), r"target must lie in \(0, 1\) for test_accuracy"),
        (lambda: SweepSettings(smoothing_window=4), "must be odd"),
        (lambda: SweepSettings(eval_every=0), "eval_every must be an int >= 1"),
        (lambda: geometric_batch_sizes(8, 100), "not smallest=8 times a power"),
        (lambda: learning_rate_grid([8, 16], 0.1, 8, scaling="cubic"), "scaling must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- nothing lost, nothing trusted by mistake


class Killed(BaseException):
    """Stands for the process being killed during a write (not an Exception: nothing may catch it)."""


def copy_of(tiny_sweep, tmp_path) -> tuple[Path, pd.DataFrame]:
    path, frame = tiny_sweep
    copy = tmp_path / "cells.csv"
    shutil.copyfile(path, copy)
    return copy, frame


def rows_of(frame: pd.DataFrame, trained: list):
    """A train_cell stand-in that returns the fixture's row of the cell (no training) and records the cell."""
    def train_cell(settings, batch_size, learning_rate, **options):
        trained.append((batch_size, learning_rate))
        match = frame[(frame.batch_size == batch_size) & (frame.learning_rate == learning_rate)]
        return match.iloc[0].to_dict()

    return train_cell


def test_a_kill_during_the_final_rewrite_leaves_every_row(tiny_sweep, tmp_path, monkeypatch):
    """The rewrite in (B, lr) order is killed after half its bytes: the file still holds every row (before, a
    stub of the first rows was left and accepted by the next resume)."""
    path, frame = copy_of(tiny_sweep, tmp_path)
    before = path.read_bytes()
    to_csv = pd.DataFrame.to_csv

    def killed_half_way(self, path_or_buf=None, *args, **options):
        text = to_csv(self, None, *args, **options)
        if path_or_buf is None:
            return text
        with contextlib.ExitStack() as stack:
            handle = path_or_buf if hasattr(path_or_buf, "write") else stack.enter_context(open(path_or_buf, "w"))
            handle.write(text[: len(text) // 2])
            handle.flush()
        raise Killed

    monkeypatch.setattr(sweep, "train_cell", lambda *args, **kw: pytest.fail("a finished cell was retrained"))
    monkeypatch.setattr(pd.DataFrame, "to_csv", killed_half_way)
    with pytest.raises(Killed):
        run_sweep(path, BATCH_SIZES, LEARNING_RATES, TINY, progress=False)
    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv", "cells.csv.lock"]  # no temporary left
    pd.testing.assert_frame_equal(run_sweep(path, BATCH_SIZES, LEARNING_RATES, TINY, progress=False), frame)


def damage(path: Path, frame: pd.DataFrame, how: str) -> tuple[int, float] | None:
    """Damage one row of the sweep CSV at ``path`` as a kill or a bad disk would; returns its cell (None when the
    damaged row repeats a cell that is also intact in the file)."""
    lines = path.read_text().split("\n")[:-1]  # header and rows, without their line ends
    reached = int(np.flatnonzero(frame.outcome == "reached")[0])
    cell = (int(frame.batch_size[reached]), float(frame.learning_rate[reached]))
    columns = list(frame.columns)

    def set_field(index: int, column: str, value: str) -> None:
        fields = next(csv.reader([lines[index + 1]]))
        fields[columns.index(column)] = value
        lines[index + 1] = ",".join(fields)

    if how == "cut in the last row":  # a kill during the append: the last line has no line end
        path.write_text("\n".join(lines) + "\n")
        text = path.read_text()
        path.write_text(text[:-5])
        return int(frame.batch_size.iloc[-1]), float(frame.learning_rate.iloc[-1])
    if how == "too few fields":
        lines[reached + 1] = lines[reached + 1].rsplit(",", 2)[0]
    elif how == "too many fields":
        lines[reached + 1] += ",7"
    elif how == "NaN steps":
        set_field(reached, "steps", "nan")
    elif how == "unparseable steps":
        set_field(reached, "steps", "1.2e")
    elif how == "NaN seconds":
        set_field(reached, "seconds", "")
    elif how == "examples not steps x B":
        set_field(reached, "examples", "3.5")
    elif how == "repeated cell":
        lines.append(lines[reached + 1])
        cell = None
    path.write_text("\n".join(lines) + "\n")
    return cell


@pytest.mark.parametrize("how", ["cut in the last row", "too few fields", "too many fields", "NaN steps",
                                 "unparseable steps", "NaN seconds", "examples not steps x B", "repeated cell"])
def test_a_damaged_row_is_dropped_with_a_warning_and_its_cell_retrained(tiny_sweep, tmp_path, monkeypatch, how):
    path, frame = copy_of(tiny_sweep, tmp_path)
    cell = damage(path, frame, how)
    with pytest.warns(RuntimeWarning, match="1 damaged row"):
        read = read_sweep_results(path)
    assert len(read) == len(frame) - (cell is not None)
    trained = []
    monkeypatch.setattr(sweep, "train_cell", rows_of(frame, trained))
    with pytest.warns(RuntimeWarning, match="damaged row.*not trusted.*trains the cells they leave missing again"):
        resumed = run_sweep(path, BATCH_SIZES, LEARNING_RATES, TINY, progress=False)
    assert trained == ([cell] if cell is not None else [])
    pd.testing.assert_frame_equal(resumed, frame)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file is whole again: the appended row did not join a cut line
        pd.testing.assert_frame_equal(read_sweep_results(path), frame)


def hold_the_lock(path: str, holding, release) -> None:
    """In another process: hold the sweep's lock on ``path`` until ``release`` is set."""
    with sweep._exclusive_lock(Path(path)):
        holding.set()
        release.wait()


def test_a_second_sweep_on_the_same_file_is_refused_while_another_process_runs_one(tiny_sweep, tmp_path,
                                                                                  monkeypatch):
    path, frame = copy_of(tiny_sweep, tmp_path)
    before = path.read_bytes()
    monkeypatch.setattr(sweep, "train_cell", lambda *args, **kw: pytest.fail("a cell was trained"))
    context = multiprocessing.get_context("spawn")
    holding, release = context.Event(), context.Event()
    holder = context.Process(target=hold_the_lock, args=(str(path), holding, release))
    holder.start()
    try:
        assert holding.wait(timeout=600), "the lock holder did not start"  # catches a hang only
        with pytest.raises(RuntimeError, match=r"cells\.csv is in use by another sweep.*cells\.csv\.lock"):
            run_sweep(path, BATCH_SIZES, LEARNING_RATES, TINY, progress=False)
        assert path.read_bytes() == before
        with sweep._exclusive_lock(path.with_name("other.csv")):  # another file's sweep is not held up
            pass
    finally:
        release.set()
        holder.join(timeout=600)
    assert holder.exitcode == 0
    pd.testing.assert_frame_equal(run_sweep(path, BATCH_SIZES, LEARNING_RATES, TINY, progress=False), frame)


def test_two_lock_holders_in_one_process_are_serialised_too(tmp_path):
    """flock belongs to the open file, so a second sweep in the same process (a thread, a notebook cell) is
    refused as well while the first runs; after it the lock is free again."""
    path = tmp_path / "cells.csv"
    with sweep._exclusive_lock(path):
        with pytest.raises(RuntimeError, match="in use by another sweep"):
            with sweep._exclusive_lock(path):
                pass
    with sweep._exclusive_lock(path):
        pass


def test_a_sweep_in_which_no_cell_reaches_the_target_keeps_its_rows_and_says_so(tmp_path, capsys):
    out = tmp_path / "none.csv"
    arguments = ["sweep", "--out", str(out), "--batch-sizes", "8,16,32", "--lr", "0.01", "--lr-reference-batch", "8",
                 "--lr-scaling", "constant", "--lr-factors", "1", "--target", "0.99", "--model", TINY.model,
                 "--train-examples", "384", "--eval-examples", "100", "--eval-every", "4", "--max-steps", "8",
                 "--seed", "3", "--no-progress"]
    assert main(arguments) == 1
    printed = capsys.readouterr().out
    assert "no fit: fewer than 3 batch sizes reached the target (test_accuracy 0.99): 0 of 3" in printed
    frame = read_sweep_results(out)
    assert list(frame.outcome) == ["censored"] * 3
    best = best_learning_rate_cells(frame)
    assert best.empty and {"batch_size", "steps", "lr_at_grid_edge"} <= set(best.columns)


@pytest.mark.parametrize("flag", ["--batch-sizes", "--lr-factors"])
def test_an_empty_list_flag_is_an_error_naming_the_flag(flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as raised:
        main(["sweep", "--out", str(tmp_path / "cells.csv"), flag, ""])
    assert raised.value.code == 2
    assert re.search(f"argument {flag}: expected (positive )?comma-separated .* got ''", capsys.readouterr().err)
    assert not (tmp_path / "cells.csv").exists()


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields_after_name = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields_after_name[1]) == pid:
                found.add(int(entry.name))
    return found


def _state(pid: int) -> str:
    """The process's state letter ("Z" also when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_parallel_workers_end_when_the_sweep_is_killed(tmp_path, hang_deadline_s):
    """SIGKILL (or a scheduler's SIGTERM) of the sweep's process left its workers training on and then waiting for
    good, holding its output streams (an audit's finding). They now end with it. The deadlines only catch a hang."""
    script = (
        "from noisescale.sweep import SweepSettings, run_sweep\n"
        "settings = SweepSettings(target=0.9, train_examples=2000, eval_examples=200, eval_every=50, max_steps=5000)\n"
        f"run_sweep({str(tmp_path / 'cells.csv')!r}, [8, 16, 32, 64], [0.01, 0.02], settings, jobs=2, progress=False)\n"
    )
    sweep = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + hang_deadline_s
        while len(_children(sweep.pid)) < 3 and time.monotonic() < deadline:   # 2 workers, the resource tracker
            time.sleep(0.2)
        workers = _children(sweep.pid)
        assert len(workers) >= 3, "the sweep started no workers"
    finally:
        sweep.kill()
        sweep.wait()
    deadline = time.monotonic() + hang_deadline_s
    try:
        while any(_state(pid) != "Z" for pid in workers):
            assert time.monotonic() < deadline, "the workers outlived the sweep"
            time.sleep(0.2)
    finally:   # none is left to a later test
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)



def _hand_made_sweep(reached_sizes, censored_sizes, rates=(0.01, 0.02, 0.04), best_rate=0.02):
    """Cells of a sweep without training: at each reached batch size the steps of S = 75 (1 + 60 / B), fewest
    at ``best_rate``; every cell of a censored batch size is censored."""
    rows = []
    for size in reached_sizes:
        for rate in rates:
            steps = 75 * (1 + 60 / size) * (1.0 if rate == best_rate else 1.3)
            rows.append({"batch_size": size, "learning_rate": rate, "outcome": "reached", "steps": steps})
    for size in censored_sizes:
        for rate in rates:
            rows.append({"batch_size": size, "learning_rate": rate, "outcome": "censored", "steps": np.nan})
    return pd.DataFrame(rows).assign(target_metric="test_accuracy", target=0.8)


def test_fit_names_the_batch_sizes_that_never_reached_the_target():
    """A new user's sweep with B = 128 and 256 censored by --max-examples printed a fit on the other four, with no
    line naming the two (they were missing from the table)."""
    frame = _hand_made_sweep([8, 16, 32, 64], [128, 256])
    with pytest.warns(RuntimeWarning, match=r"batch size\(s\) 128 \(3 censored\), 256 \(3 censored\) never reached "
                                            r"the target \(test_accuracy 0.8\).*rests on the other 4: 8, 16, 32, 64"):
        fit = fit_sweep(frame, n_bootstrap=20)
    assert fit.batch_sizes.tolist() == [8, 16, 32, 64]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_sweep(_hand_made_sweep([8, 16, 32, 64, 128], []), n_bootstrap=20)   # nothing left out, nothing said


def test_fit_says_fewer_than_three_batch_sizes_reached_or_were_swept():
    with pytest.raises(ValueError, match=r"fewer than 3 batch sizes reached the target \(test_accuracy 0.8\): 2 of 4"):
        fit_sweep(_hand_made_sweep([8, 16], [32, 64]))
    with pytest.raises(ValueError, match=r"the sweep has 2 batch size\(s\), 8, 16; .* needs at least 3: add batch"):
        fit_sweep(_hand_made_sweep([], [8, 16]))


def test_a_cell_measures_b_simple_with_the_finite_population_correction_of_its_training_set(monkeypatch):
    """The commands apply the finite-population correction (README), but a sweep cell built its monitor without
    population_size, although its batches are drawn without replacement from the training set."""
    import noisescale.monitor as monitor_module

    made = []

    class Recorded(monitor_module.NoiseScaleMonitor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(monitor_module, "NoiseScaleMonitor", Recorded)
    settings = SweepSettings(**{**TINY.__dict__, "max_steps": 8, "target": 0.99})
    row = sweep.train_cell(settings, 32, 0.03)
    (monitor,) = made
    assert monitor.population_size == TINY.train_examples
    assert row["outcome"] == "censored" and row["b_simple"] == monitor.history["b_simple"].iloc[-1]


def test_a_cell_reaches_a_target_crossed_after_its_last_evaluation_before_the_budget(monkeypatch):
    """A budget that is no multiple of eval_every (max_steps, or max_examples // B): the smoothed value at the first
    evaluation past it decides a crossing up to the budget, and the cell stopped before the evaluation it needs."""
    values = iter([0.1, 0.2, 0.3, 0.6, 0.9, 1.0, 1.0])  # smoothed at 30 and 40 steps: 0.6, 0.833
    monkeypatch.setattr(sweep, "_evaluate", lambda *args, **kwargs: next(values))
    settings = SweepSettings(**{**TINY.__dict__, "eval_every": 10, "max_steps": 35, "target": 0.65})
    row = sweep.train_cell(settings, 32, 0.03)
    assert row["outcome"] == "reached" and row["steps_trained"] == 50
    assert row["steps"] == pytest.approx(30 + 10 * (0.65 - 0.6) / (2.5 / 3 - 0.6), rel=1e-12)


def test_a_sweep_whose_target_is_met_before_any_step_is_refused(monkeypatch, tmp_path):
    """With smoothing_window 1 a target the untrained model meets gave reached cells of 0 steps, which the sweep's own
    reader then dropped as damaged rows (and a resume trained again): the sweep ended with no rows."""
    monkeypatch.setattr(sweep, "_evaluate", lambda *args, **kwargs: 0.9)
    settings = SweepSettings(**{**TINY.__dict__, "smoothing_window": 1, "target": 0.65})
    with pytest.raises(ValueError, match=r"target 0.65 is met before any training step \(the metric at step 0 is 0.9"):
        run_sweep(tmp_path / "cells.csv", [8, 16, 32], [0.03], settings, progress=False)


def test_fit_warns_when_the_best_learning_rate_sits_at_the_grid_edge_for_most_batch_sizes():
    """A new user's sweep printed a fit while the best rate sat at the grid's edge for 6 of 7 batch sizes."""
    edge = pd.concat([_hand_made_sweep([8, 16, 32], [], best_rate=0.04), _hand_made_sweep([64, 128], [])])
    with pytest.warns(RuntimeWarning, match=r"at the edge of its grid for 3 of 5 batch sizes \(8, 16, 32\).*widen"):
        fit_sweep(edge, n_bootstrap=20)
    inside = pd.concat([_hand_made_sweep([8, 16], [], best_rate=0.01), _hand_made_sweep([32, 64, 128], [])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_sweep(inside, n_bootstrap=20)   # 2 of 5 at the edge: the fit is not warned about
