"""Tests of noisescale.tradeoff and its figures in noisescale.app.plot against data drawn from the model
S = S_min (1 + B_crit / B) of McCandlish et al. (2018) with multiplicative log-normal noise."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from noisescale.app.plot import plot_steps_vs_batch, plot_tradeoff, save_figure
from noisescale.tradeoff import TradeoffFit, fit_tradeoff, fit_tradeoff_frame, read_sweep_csv, with_interval

S_MIN = 1000.0
B_CRIT = 256.0
E_MIN = S_MIN * B_CRIT
BATCH_SIZES = 2.0 ** np.arange(3, 13)  # 8 .. 4096
NOISE_SD = 0.1  # sd of log S, i.e. about 10% multiplicative scatter


def model_steps(batch_sizes: np.ndarray, s_min: float = S_MIN, b_crit: float = B_CRIT) -> np.ndarray:
    return s_min * (1.0 + b_crit / batch_sizes)


def noisy_sweep(seed: int, repeats: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch_sizes = np.repeat(BATCH_SIZES, repeats)
    steps = model_steps(batch_sizes) * np.exp(NOISE_SD * rng.standard_normal(batch_sizes.size))
    return batch_sizes, steps


@pytest.fixture(scope="module")
def noisy_fit() -> TradeoffFit:
    return fit_tradeoff(*noisy_sweep(seed=1, repeats=2), n_bootstrap=200, seed=1)


# ---------------------------------------------------------------- fit


def test_noise_free_data_gives_the_truth_exactly():
    fit = fit_tradeoff(BATCH_SIZES, model_steps(BATCH_SIZES), n_bootstrap=20)
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-6)
    assert fit.e_min == pytest.approx(E_MIN, rel=1e-6)
    assert fit.b_crit == pytest.approx(B_CRIT, rel=1e-6)
    assert fit.log_residual_std < 1e-8
    for interval, truth in [(fit.s_min_interval, S_MIN), (fit.e_min_interval, E_MIN), (fit.b_crit_interval, B_CRIT)]:
        assert interval == pytest.approx((truth, truth), rel=1e-6)


@pytest.mark.parametrize("s_min, b_crit", [(50.0, 20.0), (3e4, 1500.0), (1.0, 100.0)])
def test_noise_free_data_exact_for_other_parameters(s_min, b_crit):
    fit = fit_tradeoff(BATCH_SIZES, model_steps(BATCH_SIZES, s_min, b_crit), n_bootstrap=10)
    assert fit.s_min == pytest.approx(s_min, rel=1e-6)
    assert fit.b_crit == pytest.approx(b_crit, rel=1e-6)
    assert fit.e_min == pytest.approx(s_min * b_crit, rel=1e-6)


def test_noisy_data_recovers_s_min_and_e_min_within_5_percent():
    # 10 repeats per batch size: the sd of log S_min and log E_min is then about 2%.
    fit = fit_tradeoff(*noisy_sweep(seed=7, repeats=10), n_bootstrap=50)
    assert fit.s_min == pytest.approx(S_MIN, rel=0.05)
    assert fit.e_min == pytest.approx(E_MIN, rel=0.05)
    assert fit.log_residual_std == pytest.approx(NOISE_SD, rel=0.2)


def test_point_estimate_is_the_least_squares_minimum_of_a_brute_force_profile():
    """Independent reference: for fixed B_crit the best log S_min is the mean residual; scan log B_crit."""
    batch_sizes, steps = noisy_sweep(seed=3)
    fit = fit_tradeoff(batch_sizes, steps, n_bootstrap=10)
    log_b_crit_grid = np.linspace(np.log(10.0), np.log(5000.0), 20001)
    shapes = np.log1p(np.exp(log_b_crit_grid)[:, None] / batch_sizes[None, :])
    log_s_min = np.mean(np.log(steps)[None, :] - shapes, axis=1)
    residuals = np.log(steps)[None, :] - log_s_min[:, None] - shapes
    best = np.argmin(np.sum(residuals**2, axis=1))
    spacing = log_b_crit_grid[1] - log_b_crit_grid[0]
    assert abs(np.log(fit.b_crit) - log_b_crit_grid[best]) <= spacing
    assert np.log(fit.s_min) == pytest.approx(log_s_min[best], abs=1e-3)


def test_duplicating_every_run_leaves_the_point_estimate_unchanged():
    batch_sizes, steps = noisy_sweep(seed=4)
    once = fit_tradeoff(batch_sizes, steps, n_bootstrap=10)
    twice = fit_tradeoff(np.tile(batch_sizes, 2), np.tile(steps, 2), n_bootstrap=10)
    assert twice.s_min == pytest.approx(once.s_min, rel=1e-8)
    assert twice.b_crit == pytest.approx(once.b_crit, rel=1e-8)


def test_intervals_cover_the_truth_in_at_least_85_percent_of_100_sweeps():
    repeats = 100
    covered = np.zeros(3)
    for seed in range(repeats):
        batch_sizes, steps = noisy_sweep(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an unlucky draw may put B_crit off the grid
            fit = fit_tradeoff(batch_sizes, steps, confidence=0.9, n_bootstrap=200, seed=seed)
        for index, (interval, truth) in enumerate(
            [(fit.s_min_interval, S_MIN), (fit.e_min_interval, E_MIN), (fit.b_crit_interval, B_CRIT)]
        ):
            covered[index] += interval[0] <= truth <= interval[1]
    coverage = covered / repeats
    assert np.all(coverage >= 0.85), f"coverage of S_min, E_min, B_crit: {coverage}"
    assert np.all(coverage <= 0.98), f"intervals far too wide: coverage {coverage}"


def test_intervals_are_ordered_and_narrow_with_confidence(noisy_fit):
    for value, (low, high) in [
        (noisy_fit.s_min, noisy_fit.s_min_interval),
        (noisy_fit.e_min, noisy_fit.e_min_interval),
        (noisy_fit.b_crit, noisy_fit.b_crit_interval),
    ]:
        assert low < value < high
    narrower = fit_tradeoff(noisy_fit.batch_sizes, noisy_fit.steps, confidence=0.5, n_bootstrap=200, seed=1)
    assert narrower.s_min == noisy_fit.s_min
    assert noisy_fit.s_min_interval[0] < narrower.s_min_interval[0] < narrower.s_min_interval[1] < noisy_fit.s_min_interval[1]


def test_bootstrap_is_reproducible_from_the_seed():
    batch_sizes, steps = noisy_sweep(seed=5)
    first = fit_tradeoff(batch_sizes, steps, n_bootstrap=50, seed=11)
    again = fit_tradeoff(batch_sizes, steps, n_bootstrap=50, seed=np.random.default_rng(11))
    other = fit_tradeoff(batch_sizes, steps, n_bootstrap=50, seed=12)
    assert first.to_dict() == again.to_dict()
    assert first.s_min_interval != other.s_min_interval


def test_b_crit_outside_the_sampled_batch_sizes_warns():
    steps = model_steps(BATCH_SIZES, b_crit=1e5)
    with pytest.warns(RuntimeWarning, match="outside the sampled batch sizes"):
        fit_tradeoff(BATCH_SIZES, steps, n_bootstrap=10)


# ---------------------------------------------------------------- data that cannot resolve B_crit

# The sweeps of issue 14, each with a seed whose old fit collapsed: every bootstrap refit started at a point
# estimate that had run off to B_crit = 5.7e19 or 1e-14 .. 1e-43, so the interval was that one number.
UNRESOLVED_SWEEPS = {
    "perfect scaling only": (lambda rng: E_MIN / BATCH_SIZES * np.exp(NOISE_SD * rng.standard_normal(10)), 4),
    "saturated only": (lambda rng: S_MIN * np.exp(NOISE_SD * rng.standard_normal(10)), 2),
    "steps grow with B": (lambda rng: 100 * BATCH_SIZES**0.3 * np.exp(NOISE_SD * rng.standard_normal(10)), 0),
}


def fit_quietly(batch_sizes, steps, **options) -> TradeoffFit:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fit_tradeoff(batch_sizes, steps, **options)


@pytest.mark.parametrize("case", list(UNRESOLVED_SWEEPS))
def test_unresolvable_sweeps_say_not_resolved_once_instead_of_a_collapsed_interval(case):
    make_steps, seed = UNRESOLVED_SWEEPS[case]
    steps = make_steps(np.random.default_rng(seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_tradeoff(BATCH_SIZES, steps, n_bootstrap=200, seed=seed)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "not resolved" in messages[0] and caught[0].category is RuntimeWarning
    assert not fit.resolved
    low, high = fit.b_crit_interval
    assert "not resolved" in fit.summary() and with_interval("B_crit", fit.b_crit, (low, high)) in fit.summary()
    if case == "perfect scaling only":  # B_crit = inf fits best; E_min is measured, S_min is not
        assert (fit.b_crit, fit.s_min) == (np.inf, 0.0)
        assert high == np.inf and BATCH_SIZES.max() < low < np.inf
        assert fit.s_min_interval[0] == 0.0 and 0 < fit.s_min_interval[1] < S_MIN / 10
        assert fit.e_min_interval[0] < E_MIN < fit.e_min_interval[1] < 1.2 * E_MIN
        np.testing.assert_allclose(fit.predict_steps(BATCH_SIZES), fit.e_min / BATCH_SIZES, rtol=1e-12)
    else:  # B_crit = 0 fits best; S_min is measured, E_min is not
        assert (fit.b_crit, fit.e_min) == (0.0, 0.0)
        assert low == 0.0 and 0 < high < BATCH_SIZES.min() * 4
        assert fit.e_min_interval[0] == 0.0 and fit.s_min_interval[0] < fit.s_min < fit.s_min_interval[1]
        np.testing.assert_allclose(fit.predict_steps(BATCH_SIZES), fit.s_min, rtol=1e-12)
    assert json.loads(json.dumps(fit.to_dict()))["resolved"] is False


@pytest.mark.parametrize("case", ["perfect scaling only", "saturated only"])
def test_unresolved_side_covers_the_true_limit_in_at_least_90_percent_of_sweeps(case):
    """Data with B_crit = inf (or 0) in truth: the interval must reach inf (or 0) in >= 90% of sweeps
    (measured: 96.5% and 94% of 200 sweeps with 200 replicates each)."""
    make_steps, _ = UNRESOLVED_SWEEPS[case]
    reached = []
    for seed in range(60):
        fit = fit_quietly(BATCH_SIZES, make_steps(np.random.default_rng(100 + seed)), n_bootstrap=100, seed=seed)
        reached.append(fit.b_crit_interval[1] == np.inf if case == "perfect scaling only" else fit.b_crit_interval[0] == 0)
    assert np.mean(reached) >= 0.9


def profile_sum_of_squares(batch_sizes, steps, b_crit):
    """Independent reference: residual sum of squares at a fixed B_crit, log S_min profiled out (mean residual)."""
    shape = np.log1p(b_crit / batch_sizes)
    residuals = np.log(steps) - shape
    return np.sum((residuals - residuals.mean()) ** 2)


@pytest.mark.parametrize("seed", range(6))
def test_an_end_of_the_model_inside_the_profile_likelihood_region_is_an_unbounded_side(seed):
    """Brute-force profile over B_crit in [1e-6, 1e12]: where the F-test region reaches an end of that range
    the interval must be unbounded on that side, and a sweep from the model with its bend at 256 must be
    bounded on both."""
    rng = np.random.default_rng(seed)
    for steps in (E_MIN / BATCH_SIZES * np.exp(NOISE_SD * rng.standard_normal(10)), noisy_sweep(seed)[1]):
        fit = fit_quietly(BATCH_SIZES, steps, n_bootstrap=50, seed=seed)
        grid = np.geomspace(1e-6, 1e12, 2000)
        profile = np.array([profile_sum_of_squares(BATCH_SIZES, steps, b_crit) for b_crit in grid])
        best = min(profile.min(), profile_sum_of_squares(BATCH_SIZES, steps, 0.0))
        inside = profile <= best * (1 + stats.f.ppf(0.9, 1, 8) / 8)
        if inside[-1]:
            assert fit.b_crit_interval[1] == np.inf
        if inside[0]:
            assert fit.b_crit_interval[0] == 0.0
    assert fit.resolved and not (inside[0] or inside[-1])  # the last sweep is the one from the model


def test_noise_free_limits_are_exact():
    perfect = fit_quietly(BATCH_SIZES, E_MIN / BATCH_SIZES, n_bootstrap=10)
    assert (perfect.b_crit, perfect.s_min, perfect.resolved) == (np.inf, 0.0, False)
    assert perfect.e_min == pytest.approx(E_MIN, rel=1e-12)
    constant = fit_quietly(BATCH_SIZES, np.full(10, S_MIN), n_bootstrap=10)
    assert (constant.b_crit, constant.e_min, constant.resolved) == (0.0, 0.0, False)
    assert constant.s_min == pytest.approx(S_MIN, rel=1e-12)


# ---------------------------------------------------------------- TradeoffFit


def test_predictions_lie_on_the_hyperbola_and_spend_b_times_s_examples(noisy_fit):
    batch_sizes = np.geomspace(1.0, 1e5, 50)
    steps = noisy_fit.predict_steps(batch_sizes)
    examples = noisy_fit.predict_examples(batch_sizes)
    np.testing.assert_allclose((steps / noisy_fit.s_min - 1) * (examples / noisy_fit.e_min - 1), 1.0, rtol=1e-10)
    np.testing.assert_allclose(examples, batch_sizes * steps, rtol=1e-12)
    assert noisy_fit.predict_steps(noisy_fit.b_crit) == pytest.approx(2 * noisy_fit.s_min)
    assert noisy_fit.predict_examples(noisy_fit.b_crit) == pytest.approx(2 * noisy_fit.e_min)
    assert isinstance(noisy_fit.predict_steps(64), float)


def test_predictions_reject_non_positive_batch_sizes(noisy_fit):
    with pytest.raises(ValueError, match="batch_size must be positive and finite, got 0.0 at index 1"):
        noisy_fit.predict_steps([8, 0])
    with pytest.raises(ValueError, match="batch_size"):
        noisy_fit.predict_examples(-1.0)


def test_fit_is_frozen_and_keeps_read_only_data(noisy_fit):
    with pytest.raises(dataclasses.FrozenInstanceError):
        noisy_fit.s_min = 1.0
    with pytest.raises(ValueError):
        noisy_fit.steps[0] = 1.0
    np.testing.assert_array_equal(noisy_fit.batch_sizes, np.repeat(BATCH_SIZES, 2))


def test_to_dict_is_json_and_summary_is_one_line(noisy_fit):
    record = json.loads(json.dumps(noisy_fit.to_dict()))
    assert record["s_min"] == noisy_fit.s_min
    assert record["b_crit_interval"] == list(noisy_fit.b_crit_interval)
    assert len(record["steps"]) == 20
    summary = noisy_fit.summary()
    assert "\n" not in summary and str(noisy_fit) == summary
    assert with_interval("S_min", noisy_fit.s_min, noisy_fit.s_min_interval) in summary   # test_digits.py
    assert "90% intervals, 20 points" in summary
    assert record["resolved"] is True and noisy_fit.resolved and "not resolved" not in summary


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "batch_sizes, steps, error, message",
    [
        ([8, 8, 16, 16], [5, 6, 3, 4], ValueError, "at least 3 distinct batch sizes, got 2"),
        ([8, 16, 32], [5, 4], ValueError, "same length, got 3 and 2"),
        ([8, 16, 0, 64], [5, 4, 3, 2], ValueError, "batch_sizes must be positive and finite, got 0.0 at index 2"),
        ([8, 16, 32, 64], [5, -4, 3, 2], ValueError, "steps must be positive and finite, got -4.0 at index 1"),
        ([8, 16, 32, 64], [5, 4, np.nan, 2], ValueError, "steps must be positive and finite, got nan at index 2"),
        ([8, 16, np.inf, 64], [5, 4, 3, 2], ValueError, "batch_sizes must be positive and finite, got inf"),
        ([[8, 16], [32, 64]], [5, 4, 3, 2], ValueError, r"batch_sizes must be one-dimensional, got shape \(2, 2\)"),
        (["8", "x", "32"], [5, 4, 3], TypeError, "batch_sizes must be numeric"),
    ],
)
def test_bad_data_is_rejected_with_its_cause(batch_sizes, steps, error, message):
    with pytest.raises(error, match=message):
        fit_tradeoff(batch_sizes, steps, n_bootstrap=10)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"confidence": 1.0}, "confidence must lie in"),
        ({"confidence": 0.0}, "confidence must lie in"),
        ({"n_bootstrap": 1}, "n_bootstrap must be an integer >= 2"),
        ({"n_bootstrap": 10.5}, "n_bootstrap must be an integer >= 2"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        fit_tradeoff(BATCH_SIZES, model_steps(BATCH_SIZES), **options)


# ---------------------------------------------------------------- CSV and DataFrame


def write_csv(tmp_path, text: str):
    path = tmp_path / "sweep.csv"
    path.write_text(text)
    return path


def test_read_sweep_csv_and_fit_the_frame(tmp_path):
    batch_sizes, steps = noisy_sweep(seed=6)
    lines = ["batch_size,steps,seed"] + [f"{int(b)},{float(s)!r},{i}" for i, (b, s) in enumerate(zip(batch_sizes, steps))]
    path = write_csv(tmp_path, "\n".join(lines[:4] + [""] + lines[4:]) + "\n")  # a blank line is ignored
    frame = read_sweep_csv(path)
    assert list(frame.columns) == ["batch_size", "steps", "seed"]
    assert frame["steps"].dtype == np.float64
    np.testing.assert_array_equal(frame["batch_size"], batch_sizes)
    np.testing.assert_array_equal(frame["steps"], steps)
    from_frame = fit_tradeoff_frame(frame, n_bootstrap=20, seed=2)
    from_arrays = fit_tradeoff(batch_sizes, steps, n_bootstrap=20, seed=2)
    assert from_frame.to_dict() == from_arrays.to_dict()


def test_read_sweep_csv_with_other_column_names(tmp_path):
    path = write_csv(tmp_path, "B,S\n8,300\n16,200\n32,150\n")  # S = 100 (1 + 16 / B)
    frame = read_sweep_csv(path, batch_size_column="B", steps_column="S")
    np.testing.assert_array_equal(frame["S"], [300.0, 200.0, 150.0])
    fit = fit_tradeoff_frame(frame, batch_size_column="B", steps_column="S", n_bootstrap=10)
    assert (fit.s_min, fit.b_crit) == (pytest.approx(100.0), pytest.approx(16.0))


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch_size,seed\n8,0\n16,0\n32,0\n", r"sweep\.csv: missing column 'steps'; the header has \['batch_size', 'seed'\]"),
        ("batch_size,steps\n8,100\n16,abc\n32,30\n", r"sweep\.csv, line 3: column 'steps' is not a number: 'abc'"),
        ("batch_size,steps\n8,100\n16,60\n\n32,\n", r"sweep\.csv, line 5: column 'steps' is empty"),
        ("batch_size,steps\n8,100\n-16,60\n32,30\n", r"sweep\.csv, line 3: column 'batch_size' must be positive and finite, got -16"),
        ("batch_size,steps\n8,100\n16,inf\n32,30\n", r"sweep\.csv, line 3: column 'steps' must be positive and finite, got inf"),
        ("", r"sweep\.csv: the file is empty"),
        ("batch_size,steps\n", r"sweep\.csv: no data rows"),
        ("batch_size,steps\n8,100\n16,60,7,9\n", r"sweep\.csv: not a well-formed CSV file"),
    ],
)
def test_malformed_csv_is_rejected_naming_the_file_and_line(tmp_path, text, message):
    path = write_csv(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        read_sweep_csv(path)


def test_fit_tradeoff_frame_rejects_a_missing_column_and_non_frames():
    with pytest.raises(ValueError, match="frame has no column 'steps'"):
        fit_tradeoff_frame(pd.DataFrame({"batch_size": [8, 16, 32], "loss": [1, 2, 3]}))
    with pytest.raises(TypeError, match="frame must be a pandas DataFrame, got dict"):
        fit_tradeoff_frame({"batch_size": [8, 16, 32], "steps": [3, 2, 1]})


# ---------------------------------------------------------------- figures


def line_with_label(ax, prefix: str):
    (line,) = [line for line in ax.get_lines() if line.get_label().startswith(prefix)]
    return line


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_tradeoff_plot_draws_the_hyperbola_through_twice_the_minima(noisy_fit, tmp_path):
    import matplotlib

    figure = plot_tradeoff(noisy_fit)
    assert matplotlib.get_backend().lower() == "agg"
    (ax,) = [ax for ax in figure.axes if ax.get_xlabel().startswith("examples")]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    curve = line_with_label(ax, "fit")
    examples, steps = curve.get_xdata(), curve.get_ydata()
    np.testing.assert_allclose((steps / noisy_fit.s_min - 1) * (examples / noisy_fit.e_min - 1), 1.0, rtol=1e-9)
    log_steps_at_twice_e_min = np.interp(np.log(2 * noisy_fit.e_min), np.log(examples), np.log(steps))
    assert np.exp(log_steps_at_twice_e_min) == pytest.approx(2 * noisy_fit.s_min, rel=1e-9)
    critical_point = line_with_label(ax, "$B_{crit}$")
    assert critical_point.get_xydata().tolist() == [[2 * noisy_fit.e_min, 2 * noisy_fit.s_min]]
    assert line_with_label(ax, "$S_{min}$").get_ydata()[0] == noisy_fit.s_min
    assert line_with_label(ax, "$E_{min}$").get_xdata()[0] == noisy_fit.e_min
    scattered = ax.collections[0].get_offsets()
    np.testing.assert_allclose(scattered, np.column_stack([noisy_fit.examples, noisy_fit.steps]))
    assert_png(save_figure(figure, tmp_path / "figures" / "tradeoff.png"))


def test_steps_vs_batch_plot_on_given_axes(noisy_fit, tmp_path):
    from matplotlib.figure import Figure

    figure = Figure()
    ax = figure.add_subplot()
    assert plot_steps_vs_batch(noisy_fit, ax=ax) is figure
    curve = line_with_label(ax, "fit")
    np.testing.assert_allclose(curve.get_ydata(), noisy_fit.predict_steps(curve.get_xdata()), rtol=1e-12)
    assert line_with_label(ax, "$B_{crit}$").get_xdata()[0] == noisy_fit.b_crit
    assert_png(save_figure(figure, tmp_path / "steps.png"))


def test_save_figure_rejects_other_formats_and_objects(noisy_fit, tmp_path):
    with pytest.raises(ValueError, match="must end in .png"):
        save_figure(plot_tradeoff(noisy_fit), tmp_path / "tradeoff.pdf")
    with pytest.raises(TypeError, match="matplotlib Figure"):
        save_figure("figure", tmp_path / "tradeoff.png")


@pytest.mark.filterwarnings("ignore:.*not resolved")
def test_figures_of_an_unresolved_fit_draw_without_warnings():
    batch_sizes = 2.0 ** np.arange(3, 13)
    steps = 1e5 / batch_sizes * np.exp(np.random.default_rng(4).normal(0, 0.1, batch_sizes.size))
    fit = fit_tradeoff(batch_sizes, steps, n_bootstrap=50)
    assert not fit.resolved and fit.b_crit_interval[1] == np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for plot in (plot_tradeoff, plot_steps_vs_batch):
            figure = plot(fit)
            lines = [line for ax in figure.axes for line in ax.get_lines()]
            assert all(np.isfinite(line.get_xdata()).all() for line in lines)


def test_a_repeated_row_of_a_csv_is_left_out_with_a_warning_naming_its_line(tmp_path):
    """A new user pasted the rows of a (batch_size, steps) CSV twice: each copy counted as a measurement and the
    B_crit interval narrowed from [44, 77] to [50.0, 69.5] without a word. As the sweep's own CSV does with a
    repeated cell, the copy is left out with a warning naming its line and the first's."""
    batch_sizes, steps = noisy_sweep(seed=6)
    lines = [f"{int(b)},{float(s)!r}" for b, s in zip(batch_sizes, steps)]
    once = read_sweep_csv(write_csv(tmp_path, "\n".join(["batch_size,steps", *lines]) + "\n"))
    path = write_csv(tmp_path, "\n".join(["batch_size,steps", *lines, *lines[:2]]) + "\n")
    with pytest.warns(RuntimeWarning, match=rf"2 repeated row\(s\) left out .*: line {len(lines) + 2} repeats the "
                                            rf"row of line 2; line {len(lines) + 3} repeats the row of line 3"):
        twice = read_sweep_csv(path)
    pd.testing.assert_frame_equal(twice, once)
    # the same numbers written otherwise (8 and 8.0) are the same row; a column telling runs apart keeps both
    path = write_csv(tmp_path, "batch_size,steps\n8,300\n8.0,300.0\n16,200\n32,150\n")
    with pytest.warns(RuntimeWarning, match="line 3 repeats the row of line 2"):
        assert len(read_sweep_csv(path)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = read_sweep_csv(write_csv(tmp_path, "batch_size,steps,seed\n8,300,0\n8,300,1\n16,200,0\n32,150,0\n"))
    assert len(kept) == 4
