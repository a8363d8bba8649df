"""Batch-size sweep: measure steps-to-target across batch sizes and fit the tradeoff of McCandlish et al. (2018).

For every batch size B of a geometric range and every learning rate of a small per-B log grid, one *cell*
trains a fresh model (same seed, same initial weights) with SGD + momentum until a test metric reaches a
target, as McCandlish et al. (2018, section 3) did: per B the learning rate reaching the target in the
fewest steps is kept, and the best steps S(B) are fitted with S = S_min (1 + B_crit / B)
(:func:`noisescale.tradeoff.fit_tradeoff`).

Target crossing. The metric (``test_accuracy`` or ``test_loss``) is evaluated on a fixed evaluation set
after 0, k, 2k, ... optimizer steps (k = ``eval_every``). The curve is smoothed by a centred moving average
over ``smoothing_window`` consecutive evaluations (odd; 1 means no smoothing; a centred window adds no lag to
a locally linear curve). The target is reached at the first evaluation where the smoothed curve meets it;
the step count is interpolated linearly between that evaluation and the one before, so it is a real number.
A cell that does not reach the target within ``max_steps`` is *censored* (``outcome = "censored"``, no
steps); one whose loss becomes non-finite is ``"diverged"``.

Noise scale at the target. ``b_simple`` is the moving average of B_simple = tr(Sigma)/|G|^2 that the
:class:`~noisescale.monitor.NoiseScaleMonitor` measured during the run, read at the crossing step, with its
interval; the monitor takes the finite-population correction of the training set the batches are drawn from
without replacement (``population_size`` = the training examples used). ``b_noise`` = tr(H Sigma)/(G^T H G)
(McCandlish et al. eq. 2.8) is measured once when the run stops (``(smoothing_window - 1) / 2`` evaluations after
the crossing): ``trace_h_sigma`` and ``g_h_g`` from :func:`noisescale.hessian.hessian_noise_scale` are averaged
over ``noise_batches`` fixed training batches before taking the ratio, each batch (a window of one permutation of
the training set) with the same finite-population correction.

Each finished cell is appended at once as one row to the CSV (all settings included, one write, fsync'ed),
so an interrupted sweep resumes: cells already in the file are skipped. Cells run in spawned worker processes
(``jobs``). Nothing is lost or trusted by mistake:

* on resume every row is checked (:func:`read_sweep_results`); a row cut short by a kill (no line end), with
  the wrong number of fields, unparseable or impossible values (NaN steps of a reached cell, examples other
  than steps x B, NaN seconds, an unknown outcome) or a repeated cell is dropped with a warning and its cell
  trained again; the file is rewritten without it before anything is appended;
* the final rewrite in (B, lr) order goes through a temporary file and an atomic replace
  (:func:`noisescale.checkpoints.atomic_write`): a kill leaves the old file or the new one, never a stub;
* one sweep at a time per file: a second process on the same CSV is refused while the first holds an exclusive
  lock (``fcntl.flock``) on ``<csv>.lock`` (the lock goes with the process; the empty .lock file stays).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import math
import multiprocessing
import os
import signal
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from noisescale._checks import mark_repeated_rows
from noisescale.checkpoints import atomic_write, exclusive_lock

__all__ = [
    "SweepSettings",
    "TARGET_METRICS",
    "best_learning_rate_cells",
    "first_crossing",
    "fit_sweep",
    "geometric_batch_sizes",
    "learning_rate_grid",
    "noise_scale_at_target",
    "read_sweep_results",
    "refine_learning_rate_grid",
    "run_sweep",
    "smooth_centered",
    "train_cell",
]

TARGET_METRICS = ("test_accuracy", "test_loss")
RESULT_OUTCOMES = ("reached", "censored", "diverged")
RESULT_COLUMNS = (
    "batch_size", "learning_rate", "outcome", "steps", "examples", "steps_trained", "metric_at_stop",
    "b_simple", "b_simple_low", "b_simple_high", "b_noise", "seconds",
)


@dataclass(frozen=True)
class SweepSettings:
    """Everything a cell depends on besides (batch_size, learning_rate); every field is a CSV column."""

    target_metric: str = "test_accuracy"
    target: float = 0.8
    model: str = "noisescale.models:lenet5"
    data_source: str = "subset"  # "subset", "debian", "auto" or a folder of Fashion-MNIST/MNIST IDX files
    train_examples: int = 0  # 0: all training images of the source
    eval_examples: int = 0  # 0: all test images of the source
    eval_every: int = 10
    smoothing_window: int = 3
    max_steps: int = 3000
    max_examples: int = 0  # 0: no limit; else a cell stops at min(max_steps, max_examples // B) steps
    momentum: float = 0.9
    ema_decay: float = 0.95
    noise_batches: int = 2
    noise_batch_size: int = 256
    noise_sigma_examples: int = 16
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.target_metric not in TARGET_METRICS:
            raise ValueError(f"target_metric must be one of {TARGET_METRICS}, got {self.target_metric!r}")
        if not (isinstance(self.target, (int, float)) and math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"target must be a positive finite number, got {self.target!r}")
        if self.target_metric == "test_accuracy" and not self.target < 1:
            raise ValueError(f"target must lie in (0, 1) for test_accuracy, got {self.target!r}")
        for name, smallest in (("train_examples", 0), ("eval_examples", 0), ("eval_every", 1),
                               ("smoothing_window", 1), ("max_steps", 1), ("max_examples", 0), ("noise_batches", 1),
                               ("noise_sigma_examples", 2),
                               ("noise_batch_size", 8), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ValueError(f"{name} must be an int >= {smallest}, got {value!r}")
        if self.smoothing_window % 2 == 0:
            raise ValueError(f"smoothing_window must be odd (a centred window), got {self.smoothing_window}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay!r}")


# ---------------------------------------------------------------------------------------------- the grid
def geometric_batch_sizes(smallest: int, largest: int, factor: int = 2) -> list[int]:
    """smallest, smallest * factor, ... up to and including ``largest`` (which must be on the progression)."""
    for name, value in (("smallest", smallest), ("largest", largest), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    sizes = [smallest]
    while sizes[-1] < largest:
        sizes.append(sizes[-1] * factor)
    if sizes[-1] != largest:
        raise ValueError(f"largest={largest} is not smallest={smallest} times a power of factor={factor}")
    return sizes


def _validate_batch_sizes(batch_sizes: Sequence[int]) -> list[int]:
    sizes = list(batch_sizes)
    if not sizes:
        raise ValueError("batch_sizes is empty; give a geometric range such as geometric_batch_sizes(8, 2048)")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2:
            raise ValueError(f"batch sizes must be ints >= 2 (a gradient variance needs 2 examples), got {size!r}")
    ratios = np.array(sizes[1:], dtype=float) / np.array(sizes[:-1], dtype=float)
    if ratios.size and (ratios.min() <= 1 or not np.allclose(ratios, ratios[0], rtol=1e-9)):
        raise ValueError(f"batch_sizes must be an increasing geometric progression (constant ratio), got {sizes}")
    return [int(size) for size in sizes]


def learning_rate_grid(
    batch_sizes: Sequence[int],
    base_learning_rate: float,
    reference_batch_size: int,
    *,
    factors: Sequence[float] = (0.5, 1.0, 2.0),
    scaling: str = "linear",
    max_learning_rate: float = math.inf,
) -> dict[int, tuple[float, ...]]:
    """Per-B log grid of learning rates centred on a scaling rule.

    The centre is base_learning_rate (B / reference_batch_size)^p with p = 1 (``"linear"``, Goyal et al.
    2017), 1/2 (``"sqrt"``) or 0 (``"constant"``), capped at ``max_learning_rate`` (the curvature limit of
    SGD); the grid is the centre times each of ``factors``.
    """
    exponents = {"linear": 1.0, "sqrt": 0.5, "constant": 0.0}
    if scaling not in exponents:
        raise ValueError(f"scaling must be one of {tuple(exponents)}, got {scaling!r}")
    if not base_learning_rate > 0 or not max_learning_rate > 0:
        raise ValueError(f"learning rates must be positive, got base {base_learning_rate!r}, max {max_learning_rate!r}")
    if not factors or any(not factor > 0 for factor in factors):
        raise ValueError(f"factors must be a non-empty list of positive numbers, got {list(factors)}")
    grid = {}
    for size in _validate_batch_sizes(batch_sizes):
        centre = min(base_learning_rate * (size / reference_batch_size) ** exponents[scaling], max_learning_rate)
        grid[size] = tuple(sorted(float(f"{centre * factor:.6g}") for factor in factors))
    return grid


def _cells(batch_sizes: Sequence[int], learning_rates) -> list[tuple[int, float]]:
    sizes = _validate_batch_sizes(batch_sizes)
    if isinstance(learning_rates, Mapping):
        missing = [size for size in sizes if size not in learning_rates]
        if missing:
            raise ValueError(f"learning_rates has no grid for batch size(s) {missing}")
        grids = {size: list(learning_rates[size]) for size in sizes}
    else:
        grids = {size: list(learning_rates) for size in sizes}
    for size, grid in grids.items():
        if not grid or any(not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0) for lr in grid):
            raise ValueError(f"the learning rates for batch size {size} must be positive and finite, got {grid}")
    return [(size, float(lr)) for size in sizes for lr in sorted(set(grids[size]))]


# ---------------------------------------------------------------------------------------------- smoothing
def _checked_window(window: Any) -> int:
    """``window`` of a centred moving average: a positive odd int, else a ValueError."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int (a centred window), got {window!r}")
    return int(window)


def smooth_centered(values: Sequence[float], window: int) -> np.ndarray:
    """Centred moving average over ``window`` (a positive odd int) values; entries without a full window on both
    sides are NaN."""
    _checked_window(window)
    values = np.asarray(values, dtype=float)
    smoothed = np.full(values.shape, np.nan)
    half = window // 2
    if values.size >= window:
        smoothed[half: values.size - half] = np.convolve(values, np.ones(window) / window, mode="valid")
    return smoothed


def first_crossing(steps: Sequence[float], values: Sequence[float], target: float, *, higher_is_better: bool,
                   window: int) -> float:
    """Step at which the smoothed curve first meets ``target`` (linear interpolation), or NaN if it never does."""
    steps = np.asarray(steps, dtype=float)
    smoothed = smooth_centered(values, window)
    sign = 1.0 if higher_is_better else -1.0
    margin = sign * (smoothed - target)  # >= 0 where the target is met
    met = np.flatnonzero(margin >= 0)
    if met.size == 0:
        return math.nan
    index = int(met[0])
    if index == 0 or np.isnan(margin[index - 1]):
        return float(steps[index])
    before, after = margin[index - 1], margin[index]
    return float(steps[index - 1] + (steps[index] - steps[index - 1]) * (-before) / (after - before))


def _stop_step(budget: int, eval_every: int, window: int) -> int:
    """Steps a run trains while the target is not met: up to the first evaluation at or after ``budget`` steps
    (its smoothed value decides a crossing between the evaluation before and the budget), then ``window // 2``
    evaluations more, which its centred window needs: (ceil(budget / k) + window // 2) k."""
    return (-(-budget // eval_every) + window // 2) * eval_every


def _refuse_crossing_at_start(crossing: float, first_value: float, target: float) -> None:
    """A ValueError for a crossing at step 0 (``smoothing_window`` 1 and a target the untrained model meets): such a
    run measures nothing, and its 0 steps would be read back as a damaged row and trained again on every resume."""
    if crossing == 0:
        raise ValueError(f"the target {target:g} is met before any training step (the metric at step 0 is "
                         f"{first_value:g}), so there are no steps to the target to measure: set a target that "
                         "training has to reach")


# ---------------------------------------------------------------------------------------------- one cell
def _load_data(settings: SweepSettings):
    import torch

    from noisescale.data import SOURCES, load_fashion_mnist

    source = settings.data_source  # "subset", "debian", "auto" or a folder of IDX files
    train, test = load_fashion_mnist(source=source) if source in SOURCES else load_fashion_mnist(source)
    picker = torch.Generator().manual_seed(settings.seed)
    train_x, train_y = train.images, train.labels
    test_x, test_y = test.images, test.labels
    if settings.train_examples:
        keep = torch.randperm(len(train_y), generator=picker)[: settings.train_examples]
        train_x, train_y = train_x[keep], train_y[keep]
    if settings.eval_examples:
        keep = torch.randperm(len(test_y), generator=picker)[: settings.eval_examples]
        test_x, test_y = test_x[keep], test_y[keep]
    return train_x, train_y, test_x, test_y


def _evaluate(model, inputs, targets, metric: str, batch_size: int = 1000) -> float:
    import torch
    import torch.nn.functional as F

    from noisescale._modes import eval_mode

    total = 0.0
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(targets), batch_size):
            outputs = model(inputs[start: start + batch_size])
            batch_targets = targets[start: start + batch_size]
            if metric == "test_accuracy":
                total += (outputs.argmax(1) == batch_targets).sum().item()
            else:
                total += F.cross_entropy(outputs, batch_targets, reduction="sum").item()
    return total / len(targets)


def _b_noise(model, loss_fn, train_x, train_y, settings: SweepSettings) -> float:
    """tr(H Sigma)/(G^T H G) with numerator and denominator averaged over fixed training batches."""
    import torch

    from noisescale.hessian import hessian_noise_scale

    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(train_y), generator=generator)
    batch_size = min(settings.noise_batch_size, len(train_y))
    numerators, denominators = [], []
    for index in range(settings.noise_batches):
        chosen = order.roll(-index * batch_size)[:batch_size]
        # a window of one permutation: drawn without replacement from the training set (its correction)
        proxies = hessian_noise_scale(model, loss_fn, train_x[chosen], train_y[chosen], num_probes=2,
                                      num_sigma_examples=settings.noise_sigma_examples, generator=generator,
                                      population=len(train_y))
        numerators.append(proxies.trace_h_sigma)
        denominators.append(proxies.g_h_g)
    denominator = float(np.mean(denominators))
    return float(np.mean(numerators)) / denominator if denominator > 0 else math.inf


def train_cell(settings: SweepSettings, batch_size: int, learning_rate: float, *, threads: int = 0,
               progress: bool = False) -> dict[str, Any]:
    """Train one (batch size, learning rate) cell to the target (module docstring); returns its CSV row."""
    import torch
    from tqdm.auto import tqdm

    from noisescale.devices import resolve_device
    from noisescale.losses import per_example_cross_entropy
    from noisescale.models import load_model_factory
    from noisescale.monitor import NoiseScaleMonitor

    start_time = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(settings.device)
    train_x, train_y, test_x, test_y = (tensor.to(device) for tensor in _load_data(settings))
    if batch_size > len(train_y):
        raise ValueError(f"batch size {batch_size} exceeds the {len(train_y)} training examples")
    torch.manual_seed(settings.seed)
    model = load_model_factory(settings.model)().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=settings.momentum)
    shuffler = torch.Generator().manual_seed(settings.seed)
    higher_is_better = settings.target_metric == "test_accuracy"
    step_budget = settings.max_steps
    if settings.max_examples:
        step_budget = min(step_budget, max(1, settings.max_examples // batch_size))
    eval_steps = [0]
    eval_values = [_evaluate(model, test_x, test_y, settings.target_metric)]
    crossing, outcome, batches = math.nan, "censored", iter(())
    # each epoch's batches are drawn without replacement from the training set: its finite-population correction
    with NoiseScaleMonitor(model, per_example_cross_entropy, ema_decay=settings.ema_decay,
                           population_size=len(train_y)) as monitor, \
            tqdm(total=step_budget, desc=f"B={batch_size} lr={learning_rate:g}", disable=not progress,
                 leave=False) as bar:
        while monitor.step < _stop_step(step_budget, settings.eval_every, settings.smoothing_window):
            chosen = next(batches, None)
            if chosen is None:
                epoch = torch.randperm(len(train_y), generator=shuffler).split(batch_size)
                batches = iter(epoch[: len(train_y) // batch_size])  # full batches only
                continue
            chosen = chosen.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = monitor(train_x[chosen], train_y[chosen])
            if not torch.isfinite(loss):
                outcome = "diverged"
                break
            optimizer.step()
            bar.update()
            if monitor.step % settings.eval_every == 0:
                eval_steps.append(monitor.step)
                eval_values.append(_evaluate(model, test_x, test_y, settings.target_metric))
                crossing = first_crossing(eval_steps, eval_values, settings.target,
                                          higher_is_better=higher_is_better, window=settings.smoothing_window)
                _refuse_crossing_at_start(crossing, eval_values[0], settings.target)
                if math.isfinite(crossing):
                    outcome = "reached" if crossing <= step_budget else "censored"
                    break
        history = monitor.history
    reached = outcome == "reached"
    at_crossing = history.iloc[min(int(crossing), len(history) - 1)] if reached else history.iloc[-1]
    return {
        **asdict(settings),
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "outcome": outcome,
        "steps": crossing if reached else math.nan,
        "examples": crossing * batch_size if reached else math.nan,
        "steps_trained": monitor.step,
        "metric_at_stop": eval_values[-1],
        "b_simple": float(at_crossing.get("b_simple", math.nan)),
        "b_simple_low": float(at_crossing.get("b_simple_low", math.nan)),
        "b_simple_high": float(at_crossing.get("b_simple_high", math.nan)),
        "b_noise": _b_noise(model, per_example_cross_entropy, train_x, train_y, settings) if reached else math.nan,
        "seconds": time.perf_counter() - start_time,
    }


def _train_cell_job(settings: SweepSettings, batch_size: int, learning_rate: float, threads: int) -> dict[str, Any]:
    return train_cell(settings, batch_size, learning_rate, threads=threads)


def _end_with(parent: int) -> None:
    """A worker's initializer: the worker ends when the sweep's process does, also when that is killed (SIGKILL,
    or SIGTERM from a scheduler, leave it no time to stop its workers, which trained on and then waited for good:
    an audit's finding). Linux's PR_SET_PDEATHSIG; elsewhere nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    if os.getppid() != parent:   # the sweep ended before the call
        os._exit(1)


# ---------------------------------------------------------------------------------------------- the file
def read_sweep_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The sweep CSV as a DataFrame (floats read back exactly), sorted by batch size and learning rate.

    Damaged rows (module docstring) are left out with a RuntimeWarning that names their lines."""
    path = Path(path)
    header, rows, problems = _checked_lines(path)
    _warn_damaged(path, problems)
    return _frame_of(header, rows).sort_values(["batch_size", "learning_rate"], kind="stable").reset_index(drop=True)


def _header() -> str:
    """The CSV header line a sweep writes: the settings' fields, then RESULT_COLUMNS (the order of a row)."""
    return ",".join([*(field.name for field in fields(SweepSettings)), *RESULT_COLUMNS]) + "\n"


def _frame_of(header: str, rows: list[str]) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(header + "".join(rows)))


def _checked_lines(path: Path) -> tuple[str, list[str], list[str]]:
    """The header line, the intact row lines (with their line ends) and a description of each dropped one."""
    text = path.read_text()
    lines = text.split("\n")
    if len(lines) < 2:  # not even a complete header: a kill during the first write
        return _header(), [], [f"line 1: header cut short ({text[:40]!r})"] if text else []
    header, body, tail = lines[0] + "\n", lines[1:-1], lines[-1]
    names = next(csv.reader([header]))
    missing = [column for column in next(csv.reader([_header()])) if column not in names]
    if missing:
        raise ValueError(f"{path}: not a sweep result file, missing column(s) {missing}")
    problems, candidates, numbers = [], [], []
    for number, line in enumerate(body, start=2):
        fields_found = len(next(csv.reader([line]), []))
        if fields_found != len(names):
            problems.append(f"line {number}: {fields_found} fields, the header has {len(names)}")
        else:
            candidates.append(line + "\n")
            numbers.append(number)
    if tail:
        problems.append(f"line {len(lines)}: cut short (no line end)")
    if not candidates:
        return header, [], problems
    frame = _frame_of(header, candidates)
    cells = zip(frame["batch_size"].astype(str), frame["learning_rate"].astype(str))
    reasons = mark_repeated_rows(cells, numbers, _row_problems(frame), "cell")
    rows = []
    for line, number, reason in zip(candidates, numbers, reasons):
        if reason is not None:
            problems.append(f"line {number}: {reason}")
            continue
        rows.append(line)
    return header, rows, problems


def _row_problems(frame: pd.DataFrame) -> list[str | None]:
    """Per row, why its values cannot be trusted (None: they can)."""
    def number(column: str) -> np.ndarray:
        return pd.to_numeric(frame[column], errors="coerce").to_numpy(float)

    size, rate, steps, examples = number("batch_size"), number("learning_rate"), number("steps"), number("examples")
    trained, seconds = number("steps_trained"), number("seconds")
    outcome = frame["outcome"].astype(str).to_numpy()
    reached = outcome == "reached"
    with np.errstate(invalid="ignore"):
        checks = [
            (~(np.isfinite(size) & (size >= 1) & (np.mod(size, 1) == 0)), "batch_size is not a positive integer"),
            (~(np.isfinite(rate) & (rate > 0)), "learning_rate is not a positive number"),
            (~np.isin(outcome, RESULT_OUTCOMES), f"outcome is not one of {RESULT_OUTCOMES}"),
            (~(np.isfinite(trained) & (trained >= 0)), "steps_trained is not a number >= 0"),
            (~(np.isfinite(seconds) & (seconds >= 0)), "seconds is not a number >= 0"),
            (reached & ~(np.isfinite(steps) & (steps > 0)), "a reached cell without a positive number of steps"),
            (reached & ~np.isclose(examples, steps * size, rtol=1e-9, atol=0), "examples is not steps x batch_size"),
        ]
    reasons: list[str | None] = [None] * len(frame)
    for failed, reason in reversed(checks):  # the first failed check is reported
        for index in np.flatnonzero(failed):
            reasons[index] = reason
    return reasons


def _warn_damaged(path: Path, problems: list[str]) -> None:
    if problems:
        warnings.warn(f"{path}: {len(problems)} damaged row(s) left out, not trusted (a resumed sweep trains the "
                      "cells they leave missing again): " + "; ".join(problems), RuntimeWarning, stacklevel=3)


def _exclusive_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock on ``<path>.lock`` for the block, or refuse at once if another process holds it."""
    lock_path = path.with_name(path.name + ".lock")
    return exclusive_lock(lock_path, f"{path} is in use by another sweep, which holds the lock {lock_path}; wait "
                                     "for it to finish (then run again to resume) or write this sweep to another file")


def _resume(path: Path, settings: SweepSettings) -> set[tuple[int, float]]:
    """The cells already in the file; damaged rows are dropped (warned) and the file rewritten without them."""
    if not path.exists() or path.stat().st_size == 0:
        return set()
    header, rows, problems = _checked_lines(path)
    if problems:
        _warn_damaged(path, problems)
        with atomic_write(path) as handle:
            handle.write(header + "".join(rows) if rows else "")
    if not rows:
        return set()
    frame = _frame_of(header, rows)
    for name, value in asdict(settings).items():
        differing = frame[frame[name] != value]
        if len(differing):
            raise ValueError(
                f"{path}: holds cells of another sweep ({name} = {differing[name].tolist()[0]!r}, this sweep has "
                f"{value!r}); write to another file or use the same settings"
            )
    return {(int(size), float(lr)) for size, lr in zip(frame["batch_size"], frame["learning_rate"])}


def _append_row(path: Path, row: dict[str, Any]) -> None:
    """One row (with the header if the file is new) in one write, fsync'ed; a kill leaves at most a row without
    its line end, which the next resume drops."""
    frame = pd.DataFrame([row])
    header = not path.exists() or path.stat().st_size == 0
    with path.open("a") as handle:
        handle.write(frame.to_csv(index=False, header=header))
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------- the sweep


def run_sweep(
    path: str | os.PathLike[str],
    batch_sizes: Sequence[int],
    learning_rates: Sequence[float] | Mapping[int, Sequence[float]],
    settings: SweepSettings = SweepSettings(),
    *,
    jobs: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """Train every (B, lr) cell not yet in the CSV at ``path`` and append its row; return the whole sweep.

    ``learning_rates``: one grid for all batch sizes or a mapping B -> grid (e.g. :func:`learning_rate_grid`).
    ``jobs`` > 1 trains cells in that many spawned processes, each with cpu_count // jobs torch threads.
    Each cell is seeded by ``settings.seed`` alone, so its result does not depend on the order or the jobs.
    Another process running a sweep on the same file is refused with a RuntimeError (module docstring).
    """
    if not isinstance(settings, SweepSettings):
        raise TypeError(f"settings must be a SweepSettings, got {type(settings).__name__}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    path = Path(path)
    cells = _cells(batch_sizes, learning_rates)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path):
        return _run_cells(path, cells, settings, jobs, progress)


def _run_cells(path: Path, cells: list[tuple[int, float]], settings: SweepSettings, jobs: int,
               progress: bool) -> pd.DataFrame:
    from tqdm.auto import tqdm

    finished = _resume(path, settings)
    todo = [cell for cell in cells if cell not in finished]
    with tqdm(total=len(cells), initial=len(cells) - len(todo), desc="sweep cells", disable=not progress) as bar:
        if jobs == 1:
            for size, lr in todo:
                _append_row(path, train_cell(settings, size, lr, progress=progress))
                bar.update()
        else:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_end_with,
                                     initargs=(os.getpid(),)) as pool:
                futures = [pool.submit(_train_cell_job, settings, size, lr, threads) for size, lr in todo]
                for future in as_completed(futures):
                    _append_row(path, future.result())
                    bar.update()
    frame = read_sweep_results(path)
    with atomic_write(path) as handle:  # rewritten in (batch size, learning rate) order
        frame.to_csv(handle, index=False)
    return frame


def best_learning_rate_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Per batch size, the cell that reached the target in the fewest steps (ties: the smaller learning rate).

    Columns added: ``learning_rates_tried``, ``cells_reached`` and ``lr_at_grid_edge`` (True when the best
    learning rate is the smallest or largest of the grid tried at that B, so the grid may be too narrow).
    Batch sizes where no cell reached the target are left out.
    """
    missing = [column for column in ("batch_size", "learning_rate", "outcome", "steps") if column not in frame]
    if missing:
        raise ValueError(f"frame has no column(s) {missing}; columns are {list(frame.columns)}")
    rows = []
    for size, group in frame.groupby("batch_size", sort=True):
        reached = group[group["outcome"] == "reached"].sort_values(["steps", "learning_rate"], kind="stable")
        if reached.empty:
            continue
        best = reached.iloc[0].copy()
        tried = np.sort(group["learning_rate"].unique())
        best["learning_rates_tried"] = len(tried)
        best["cells_reached"] = len(reached)
        best["lr_at_grid_edge"] = len(tried) > 1 and best["learning_rate"] in (tried[0], tried[-1])
        rows.append(best)
    columns = [*frame.columns, "learning_rates_tried", "cells_reached", "lr_at_grid_edge"]
    return pd.DataFrame(rows, columns=columns).reset_index(drop=True)  # the columns even when no cell reached


def refine_learning_rate_grid(frame: pd.DataFrame, factor: float = 2.0) -> dict[int, tuple[float, ...]]:
    """Per batch size, the learning rates tried plus one more past the grid's edge where the best one sits.

    Where the fewest steps came from the smallest (largest) learning rate tried, the optimum may lie outside the
    grid and the steps to target are overestimated; this adds best / ``factor`` (best * ``factor``). Batch sizes
    whose best learning rate is inside the grid, or with one learning rate tried, or none reaching the target,
    keep their grid. Pass the result to :func:`run_sweep` (finished cells are skipped) and repeat until it
    returns the grids already tried.
    """
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
        raise ValueError(f"factor must be a finite number > 1, got {factor!r}")
    best = best_learning_rate_cells(frame).set_index("batch_size")
    grids = {}
    for size, group in frame.groupby("batch_size", sort=True):
        tried = sorted(group["learning_rate"].unique())
        if size in best.index and best.loc[size, "lr_at_grid_edge"]:
            best_rate = best.loc[size, "learning_rate"]
            tried.append(best_rate * factor if best_rate == tried[-1] else best_rate / factor)
        grids[int(size)] = tuple(sorted(float(f"{rate:.6g}") for rate in tried))
    return grids


def noise_scale_at_target(best: pd.DataFrame) -> dict[str, float]:
    """Medians of B_simple and B_noise at the target over the best-learning-rate cells, each over its finite values.

    B_noise is infinite where the unbiased G^T H G estimate came out <= 0 (the curvature-weighted gradient
    unresolved against its noise at the batch measured): such cells are counted in ``b_noise_unresolved`` and
    left out of the median rather than dragging it up. NaN when no cell has a finite value.
    """
    result: dict[str, float] = {}
    for column in ("b_simple", "b_noise"):
        values = best[column].to_numpy(float)
        finite = values[np.isfinite(values)]
        result[column] = float(np.median(finite)) if finite.size else math.nan
        result[f"{column}_unresolved"] = int(values.size - finite.size)
    return result


def fit_sweep(frame: pd.DataFrame, **fit_options: Any):
    """:func:`noisescale.tradeoff.fit_tradeoff` on the best-learning-rate cell of each batch size.

    Batch sizes where no cell reached the target (censored or diverged) are left out of the fit with a
    RuntimeWarning naming them: a censored batch size needs more steps than its budget, which the fit does not
    see, so the fit rests on the others (and extrapolates where they were). A RuntimeWarning also names the batch
    sizes whose best learning rate sits at the edge of its grid when they are more than half (the optimum may lie
    outside, and the steps there are then overestimated; widen the grid, e.g. with
    :func:`refine_learning_rate_grid`). Fewer than the fit's minimum of batch sizes reaching the target is a
    ValueError saying so.
    """
    from noisescale.tradeoff import MIN_DISTINCT_BATCH_SIZES, fit_tradeoff

    best = best_learning_rate_cells(frame)
    target = (f" ({frame['target_metric'].iloc[0]} {frame['target'].iloc[0]:g})"
              if len(frame) and {"target_metric", "target"} <= set(frame.columns) else "")
    swept, reached = frame["batch_size"].nunique(), best["batch_size"].nunique()
    need = MIN_DISTINCT_BATCH_SIZES
    if swept < need:
        raise ValueError(f"the sweep has {swept} batch size(s), {_listed(sorted(frame['batch_size'].unique()))}; "
                         f"the fit S = S_min (1 + B_crit / B) needs at least {need}: add batch sizes and run the "
                         "sweep again into the same file (the cells already trained are kept there and skipped)")
    if reached < need:
        raise ValueError(f"fewer than {need} batch sizes reached the target{target}: {reached} of {swept}; the fit "
                         f"S = S_min (1 + B_crit / B) needs at least {need}. Lower the target or raise max_steps or "
                         "the learning rates, then run the sweep again into the same file: the cells already "
                         "trained are kept there and skipped")
    unreached = [size for size in sorted(frame["batch_size"].unique()) if size not in set(best["batch_size"])]
    if unreached:
        outcomes = []
        for size in unreached:
            counts = frame.loc[frame["batch_size"] == size, "outcome"].value_counts()
            outcomes.append(f"{size:g} ({', '.join(f'{n} {outcome}' for outcome, n in counts.items())})")
        warnings.warn(f"batch size(s) {', '.join(outcomes)} never reached the target{target} and are left out of "
                      f"the fit, which rests on the other {reached}: {_listed(best['batch_size'])}. A censored "
                      "batch size needs more steps than its budget; raise max_steps (max_examples) or the learning "
                      "rates to measure it", RuntimeWarning, stacklevel=2)
    edge = best.loc[best["lr_at_grid_edge"].astype(bool), "batch_size"]
    if len(edge) > len(best) / 2:
        warnings.warn(f"the best learning rate is at the edge of its grid for {len(edge)} of {len(best)} batch "
                      f"sizes ({_listed(edge)}): the optimum may lie outside the grid and the steps there are then "
                      "overestimated; widen the grid (--lr-factors, or refine_learning_rate_grid) and run the "
                      "sweep again into the same file", RuntimeWarning, stacklevel=2)
    return fit_tradeoff(best["batch_size"].to_numpy(float), best["steps"].to_numpy(float), **fit_options)


def _listed(sizes) -> str:
    return ", ".join(f"{size:g}" for size in sizes)
