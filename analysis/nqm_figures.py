"""Regenerate the NQM figures of Zhang et al. 2019 (Figure 3a: momentum and preconditioning; Figure 4:
exponential moving average; Figure 14: optimal learning rate vs batch size) on the paper's model
(h_i = 1/i, d = 10^4, C = H, 100 bins, target risk 0.01, batch sizes 2^0..2^20), and the critical batch size of
tuned momentum with tuned EMA, a combination the paper does not plot (most of the script's time).

Writes under data/nqm/: curves.csv (one row per setting and batch size), critical_batch_sizes.csv,
lower_bound.csv and the PNGs momentum_preconditioning.png, ema.png, optimal_learning_rate.png.

Usage: python3 analysis/nqm_figures.py [--out data/nqm] [--no-progress]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from noisescale import nqm

BATCH_SIZES = 2.0 ** np.arange(21)
POWERS = (0.0, 0.25, 0.5, 0.75, 1.0)
# (momentum mode, ema mode): "none", a fixed value, or "tuned" (grid search over DEFAULT_*_GRID)
VARIANTS = (("none", "none"), ("0.9", "none"), ("tuned", "none"), ("none", "tuned"), ("tuned", "tuned"))


def _curve(model, power, momentum_mode, ema_mode):
    optimizer = nqm.OptimizerSetting(momentum=0.9 if momentum_mode == "0.9" else 0.0, precondition_power=power)
    return nqm.steps_vs_batch_size(
        model, optimizer, BATCH_SIZES,
        momenta=nqm.DEFAULT_MOMENTUM_GRID if momentum_mode == "tuned" else None,
        emas=nqm.DEFAULT_EMA_GRID if ema_mode == "tuned" else None,
    )


def compute(progress: bool) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    model = nqm.paper_model()
    frames, critical = [], []
    jobs = [(p, m, e) for p in POWERS for m, e in VARIANTS]
    for power, momentum_mode, ema_mode in tqdm(jobs, desc="NQM settings", disable=not progress):
        curve = _curve(model, power, momentum_mode, ema_mode)
        frame = curve.to_frame()
        frame.insert(0, "ema_mode", ema_mode)
        frame.insert(0, "momentum_mode", momentum_mode)
        frame.insert(0, "precondition_power", power)
        frames.append(frame)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = nqm.fit_scaling_curve(curve, n_bootstrap=500)
        critical.append({
            "precondition_power": power, "momentum_mode": momentum_mode, "ema_mode": ema_mode,
            "critical_batch_size": nqm.critical_batch_size(curve.batch_sizes, curve.steps),
            "fit_b_crit": fit.b_crit, "fit_b_crit_low": fit.b_crit_interval[0],
            "fit_b_crit_high": fit.b_crit_interval[1], "fit_s_min": fit.s_min, "fit_e_min": fit.e_min,
            "fit_log_residual_std": fit.log_residual_std, "fit_warning": "; ".join(str(w.message) for w in caught),
            "steps_at_batch_1": curve.steps[0], "steps_at_largest_batch": curve.steps[-1],
        })
    bound = pd.DataFrame({"batch_size": BATCH_SIZES, "steps": nqm.lower_bound_steps(model, BATCH_SIZES, 0.01)})
    return pd.concat(frames, ignore_index=True), pd.DataFrame(critical), bound


def plot(curves: pd.DataFrame, bound: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    powers = sorted(curves.precondition_power.unique())
    palette = dict(zip(powers, sns.color_palette("viridis", len(powers))))

    def steps_panel(ax, solid, dashed, title):
        for power in powers:
            for (momentum_mode, ema_mode), style in ((dashed, "--"), (solid, "-")):
                rows = curves[(curves.precondition_power == power) & (curves.momentum_mode == momentum_mode)
                              & (curves.ema_mode == ema_mode)]
                ax.plot(np.log2(rows.batch_size), np.log2(rows.steps), style, color=palette[power],
                        label=f"pow {power:g}" if style == "-" else None)
        ax.plot(np.log2(bound.batch_size), np.log2(bound.steps), "k--", label="lower bound")
        ax.set(xlabel="log2 batch size", ylabel="log2 steps to threshold", title=title, ylim=(-1, 24))
        ax.legend(fontsize=8)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    steps_panel(ax, ("tuned", "none"), ("none", "none"), "Momentum (solid, tuned) vs SGD (dashed)")
    fig.tight_layout()
    fig.savefig(out / "momentum_preconditioning.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    steps_panel(ax, ("none", "tuned"), ("none", "none"), "SGD with EMA (solid, tuned) vs SGD (dashed)")
    fig.tight_layout()
    fig.savefig(out / "ema.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, mode, title in zip(axes, ("none", "0.9", "tuned"), ("(a) without momentum", "(b) momentum 0.9",
                                                                 "(c) tuned momentum")):
        for power in powers:
            rows = curves[(curves.precondition_power == power) & (curves.momentum_mode == mode) & (curves.ema_mode == "none")]
            ax.plot(np.log2(rows.batch_size), np.log2(rows.effective_learning_rate), "-", color=palette[power],
                    label=f"pow {power:g}")
            if mode != "none":
                base = curves[(curves.precondition_power == power) & (curves.momentum_mode == "none") & (curves.ema_mode == "none")]
                ax.plot(np.log2(base.batch_size), np.log2(base.learning_rate), ":", color=palette[power])
        ax.set(xlabel="log2 batch size", ylabel="log2 optimal (effective) learning rate", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "optimal_learning_rate.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "nqm")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    curves, critical, bound = compute(progress=not args.no_progress)
    curves.to_csv(args.out / "curves.csv", index=False)
    critical.to_csv(args.out / "critical_batch_sizes.csv", index=False)
    bound.to_csv(args.out / "lower_bound.csv", index=False)
    plot(curves, bound, args.out)
    print(critical[["precondition_power", "momentum_mode", "ema_mode", "critical_batch_size", "fit_b_crit",
                    "fit_b_crit_low", "fit_b_crit_high"]].to_string(index=False))


if __name__ == "__main__":
    main()
