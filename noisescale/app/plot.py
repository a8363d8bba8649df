"""Seaborn figures shared by the CLI, analysis scripts and notebooks.

A flat module of independent functions. Each builds its figure on the Agg canvas (``matplotlib.use("Agg")``
inside the function, never at import) or draws on a given ``ax``, and returns the
:class:`matplotlib.figure.Figure`; :func:`save_figure` writes it as a PNG.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from noisescale.tradeoff import TradeoffFit

__all__ = [
    "plot_noise_scale_history", "plot_noise_scale_vs_b_crit", "plot_steps_vs_batch", "plot_tradeoff",
    "plot_training_curves", "save_figure",
]

_FIGURE_SIZE = (6.0, 4.5)
_CURVE_POINTS = 400
_CURVE_MARGIN = 2.0  # the fitted curve spans the sampled batch sizes widened by this factor each way


def plot_tradeoff(fit: TradeoffFit, ax: Axes | None = None, *, palette: str = "viridis") -> Figure:
    """Steps against examples to the target (McCandlish et al. 2018, fig. 2): the Pareto front.

    Draws the runs as a log-log scatter of (E, S) coloured by batch size, the fitted hyperbola
    (S / S_min - 1)(E / E_min - 1) = 1 traced by B through S_min (1 + B_crit / B) and E_min (1 + B / B_crit),
    its asymptotes S = S_min and E = E_min, and the point B = B_crit where S = 2 S_min and E = 2 E_min.
    """
    figure, ax = _figure_and_axes(ax)
    curve_batch_sizes = _curve_batch_sizes(fit)
    ax.plot(
        fit.predict_examples(curve_batch_sizes), fit.predict_steps(curve_batch_sizes),
        color="black", label="fit: $(S/S_{min}-1)(E/E_{min}-1)=1$", zorder=2,
    )
    ax.axhline(fit.s_min, color="grey", linestyle="--", linewidth=1, label=f"$S_{{min}}$ = {fit.s_min:.3g}")
    ax.axvline(fit.e_min, color="grey", linestyle=":", linewidth=1, label=f"$E_{{min}}$ = {fit.e_min:.3g}")
    if _is_finite_positive(fit.b_crit):
        ax.plot(
            [2 * fit.e_min], [2 * fit.s_min], marker="*", markersize=14, color="crimson", linestyle="none",
            label=f"$B_{{crit}}$ = {fit.b_crit:.3g}", zorder=4,
        )
    _scatter_by_batch_size(ax, fit.examples, fit.steps, fit.batch_sizes, palette)
    _log_log_axes(ax)
    ax.set_xlabel("examples to target $E$")
    ax.set_ylabel("steps to target $S$")
    ax.set_title("Steps-examples tradeoff")
    ax.legend(loc="upper right", fontsize="small")
    return figure


def plot_steps_vs_batch(fit: TradeoffFit, ax: Axes | None = None, *, palette: str = "viridis") -> Figure:
    """Steps to the target against batch size: the runs, the fit S = S_min (1 + B_crit / B), the asymptote
    S_min, and B_crit as a vertical line with its confidence interval shaded."""
    figure, ax = _figure_and_axes(ax)
    curve_batch_sizes = _curve_batch_sizes(fit)
    ax.plot(curve_batch_sizes, fit.predict_steps(curve_batch_sizes), color="black",
            label="fit: $S_{min}(1 + B_{crit}/B)$", zorder=2)
    ax.axhline(fit.s_min, color="grey", linestyle="--", linewidth=1, label=f"$S_{{min}}$ = {fit.s_min:.3g}")
    if _is_finite_positive(fit.b_crit):
        ax.axvline(fit.b_crit, color="crimson", linewidth=1, label=f"$B_{{crit}}$ = {fit.b_crit:.3g}")
    ax.axvspan(*_drawable_interval(fit), color="crimson", alpha=0.12,
               label=f"{100 * fit.confidence:g}% interval of $B_{{crit}}$")
    _scatter_by_batch_size(ax, fit.batch_sizes, fit.steps, fit.batch_sizes, palette)
    _log_log_axes(ax)
    ax.set_xlabel("batch size $B$")
    ax.set_ylabel("steps to target $S$")
    ax.set_title("Steps against batch size")
    ax.legend(loc="upper right", fontsize="small")
    return figure


def save_figure(figure: Figure, path: str | PathLike[str]) -> Path:
    """Write ``figure`` as a PNG (dpi 150, tight bounding box), creating the parent folder; returns the path."""
    from matplotlib.figure import Figure

    if not isinstance(figure, Figure):
        raise TypeError(f"figure must be a matplotlib Figure, got {type(figure).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; the path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, bbox_inches="tight", format="png")
    return path


def _figure_and_axes(ax: Axes | None) -> tuple[Figure, Axes]:
    """The given axes and their figure, or a new seaborn-styled figure on the Agg canvas."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    with sns.axes_style("whitegrid"):
        figure, ax = plt.subplots(figsize=_FIGURE_SIZE)
    plt.close(figure)  # the caller owns the figure; pyplot keeps no reference to it
    return figure, ax


def _log_log_axes(ax: Axes) -> None:
    """Log scales on both axes; on a range under two decades the minor ticks at 2 and 5 times each decade
    are labelled too (matplotlib's default labels all minor ticks there, and they collide)."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        axis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 2)))


def _is_finite_positive(value: float) -> bool:
    return bool(0 < value < np.inf)


def _drawable_interval(fit: TradeoffFit) -> tuple[float, float]:
    """B_crit's interval on a log axis: an unresolved side (0 or inf) runs to the edge of the drawn curve."""
    low, high = fit.b_crit_interval
    curve = _curve_batch_sizes(fit)
    return (low if low > 0 else curve[0], high if high < np.inf else curve[-1])


def _curve_batch_sizes(fit: TradeoffFit) -> np.ndarray:
    """Log-spaced batch sizes around the sampled ones, always including a resolved B_crit."""
    critical = [fit.b_crit] if _is_finite_positive(fit.b_crit) else []
    low = min([fit.batch_sizes.min(), *critical]) / _CURVE_MARGIN
    high = max([fit.batch_sizes.max(), *critical]) * _CURVE_MARGIN
    return np.union1d(np.geomspace(low, high, _CURVE_POINTS), critical)


def _scatter_by_batch_size(
    ax: Axes, x: np.ndarray, y: np.ndarray, batch_sizes: np.ndarray, palette: str
) -> None:
    """Scatter of the runs with hue on a log scale of batch size and a colour bar instead of a legend."""
    import seaborn as sns
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    norm = LogNorm(vmin=batch_sizes.min(), vmax=batch_sizes.max())
    sns.scatterplot(x=x, y=y, hue=batch_sizes, hue_norm=norm, palette=palette, ax=ax,
                    legend=False, s=40, edgecolor="black", linewidth=0.4, zorder=3)
    colour_bar = ax.figure.colorbar(ScalarMappable(norm=norm, cmap=palette), ax=ax)
    colour_bar.set_label("batch size $B$")


def plot_noise_scale_history(history: pd.DataFrame) -> Figure:
    """A monitor's history (:attr:`noisescale.monitor.NoiseScaleMonitor.history`) against examples seen: above,
    B_simple as its moving average with the confidence band, the single-batch estimates faint, and B_noise
    where it was measured; below, the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    with sns.axes_style("whitegrid"):
        figure, (noise_ax, loss_ax) = plt.subplots(2, 1, figsize=(7.0, 6.0), sharex=True)
    plt.close(figure)
    measured = history[history["measured"].astype(bool) & ~history["nonfinite"].fillna(False).astype(bool)]
    if "b_simple" in measured and measured["b_simple"].notna().any():
        single = measured[measured["b_simple_batch"] > 0]
        noise_ax.scatter(single["examples_seen"], single["b_simple_batch"], s=4, alpha=0.25, color="tab:blue",
                         label="$B_{simple}$, single batch")
        noise_ax.plot(measured["examples_seen"], measured["b_simple"], color="tab:blue",
                      label="$B_{simple}$, moving average")
        noise_ax.fill_between(measured["examples_seen"], measured["b_simple_low"], measured["b_simple_high"],
                              color="tab:blue", alpha=0.2, label="interval")
    if "b_noise" in history and history["b_noise"].notna().any():
        points = history[history["b_noise"].notna()]
        # dotted: a moving average of a few Hessian measurements, often not resolved (the summary says)
        noise_ax.plot(points["examples_seen"], points["b_noise"], "o:", color="crimson",
                      label="$B_{noise}$, moving average of the Hessian measurements")
    plotted = [line.get_ydata() for line in noise_ax.get_lines()]
    if any(((values > 0) & np.isfinite(values)).any() for values in map(np.asarray, plotted)):
        noise_ax.set_yscale("log")  # else linear: no finite positive estimate (|G|^2 not resolved) to log-scale
    noise_ax.set_ylabel("noise scale (examples)")
    noise_ax.legend(loc="best", fontsize="small")
    sns.lineplot(data=history, x="examples_seen", y="loss", ax=loss_ax, color="tab:gray")
    loss_ax.set_xlabel("examples seen")
    loss_ax.set_ylabel("training loss")
    figure.tight_layout()
    return figure


def plot_noise_scale_vs_b_crit(frame: pd.DataFrame, fit: TradeoffFit, ax: Axes | None = None) -> Figure:
    """Noise scale measured at the target in each sweep cell (B_simple, B_noise; best learning rate per B
    filled, others faint) against the batch size, beside the fitted B_crit and its interval (horizontal band).

    McCandlish et al. (2018) predict B_crit ~ B_noise: the points should lie near the band.
    """
    from noisescale.sweep import best_learning_rate_cells

    figure, ax = _figure_and_axes(ax)
    reached = frame[frame["outcome"] == "reached"]
    best = best_learning_rate_cells(frame)  # sorted by batch size
    for column, colour, label in (("b_simple", "tab:blue", "B_simple"), ("b_noise", "tab:red", "B_noise")):
        ax.scatter(reached["batch_size"], reached[column], color=colour, alpha=0.25, s=18)
        ax.plot(best["batch_size"], best[column], "o-", color=colour, label=f"{label} at the target (best lr)")
    ax.axhspan(*_drawable_interval(fit), color="tab:gray", alpha=0.2, label=f"B_crit interval ({fit.confidence:.0%})")
    if _is_finite_positive(fit.b_crit):
        ax.axhline(fit.b_crit, color="black", linestyle="--", label=f"fitted B_crit = {fit.b_crit:.3g}")
    _log_log_axes(ax)
    ax.set_xlabel("batch size B of the run")
    ax.set_ylabel("noise scale / B_crit (examples)")
    ax.legend(loc="best", fontsize="small")
    return figure


def plot_training_curves(history: pd.DataFrame, evaluations: pd.DataFrame) -> Figure:
    """Adaptive-batch training (:mod:`noisescale.training`): the test metric (accuracy, or the test loss where
    there is no accuracy) against epochs and against optimizer steps; the batch size with the noise scale measured
    during training (B_simple's moving average, dashed, and B_noise, dotted, where measured) against epochs, on
    one axis in examples, so that one sees what the batch size followed; and the learning rate against epochs.
    ``history`` has one row per step (epoch, step, batch_size, learning_rate, optionally b_simple and b_noise),
    ``evaluations`` one per evaluation (epoch, step, test_accuracy or test_loss); with ``mode`` (and ``seed``)
    columns each mode gets a colour and each seed its own line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    with sns.axes_style("whitegrid"):
        figure, axes = plt.subplots(2, 2, figsize=(11.0, 7.5))
    plt.close(figure)
    hue = "mode" if "mode" in history else None
    units = "seed" if "seed" in history else None
    lines = {"hue": hue, "units": units, "estimator": None if units else "mean", "linewidth": 1.2}
    (metric_epoch_ax, metric_step_ax), (batch_ax, rate_ax) = axes
    metric = "test_accuracy" if "test_accuracy" in evaluations and evaluations["test_accuracy"].notna().any() \
        else "test_loss"
    label = "test accuracy" if metric == "test_accuracy" else "test loss"
    sns.lineplot(data=evaluations, x="epoch", y=metric, marker="o", ax=metric_epoch_ax, **lines)
    sns.lineplot(data=evaluations, x="step", y=metric, marker="o", ax=metric_step_ax, **lines)
    sns.lineplot(data=history, x="epoch", y="batch_size", ax=batch_ax, drawstyle="steps-post", **lines)
    legend = [Line2D([], [], color="grey", label="batch size $B$")]
    for column, style, name in (("b_simple", "--", "$B_{simple}$ (moving average)"), ("b_noise", ":", "$B_{noise}$")):
        if column in history and history[column].notna().any():
            measured = history[history[column].notna() & np.isfinite(history[column].astype(float))]
            sns.lineplot(data=measured, x="epoch", y=column, ax=batch_ax, linestyle=style, alpha=0.8,
                         marker="o" if column == "b_noise" else None, **lines)
            legend.append(Line2D([], [], color="grey", linestyle=style, label=name))
    sns.lineplot(data=history, x="epoch", y="learning_rate", ax=rate_ax, drawstyle="steps-post", **lines)
    metric_step_ax.set_xscale("log")
    steps = evaluations["step"][evaluations["step"] > 0]
    if len(steps) and steps.max() >= 10 * steps.min():   # else the minor ticks' labels are the only ones in range
        metric_step_ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in (batch_ax, rate_ax):
        ax.set_yscale("log")
    metric_epoch_ax.set(xlabel="epoch", ylabel=label, title=f"{label.capitalize()} against epochs")
    metric_step_ax.set(xlabel="optimizer steps", ylabel=label, title=f"{label.capitalize()} against steps")
    batch_ax.set(xlabel="epoch", ylabel="examples", title="Batch size and measured noise scale")
    rate_ax.set(xlabel="epoch", ylabel="learning rate $\\epsilon$", title="Learning rate")
    for ax in axes.flat[1:]:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if len(legend) > 1:
        batch_ax.legend(handles=legend, loc="best", fontsize="small")
    figure.tight_layout()
    return figure
