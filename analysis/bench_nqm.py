"""Time one figure's sweep of the noisy quadratic model: batch sizes 2^0..2^20, the default learning-rate
grid, four optimizer settings (SGD, momentum 0.9, p = 0.5, p = 1) on the paper's model (d = 10^4), binned
(100 bins) and on the exact spectrum (10^4 directions).

Usage: python3 analysis/bench_nqm.py [--repeats 5] [--out data/bench/nqm.csv]
(prints and writes the median, min and max wall time of the repeats per model; a benchmark, not a test: the
machine's load shows in the spread)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from noisescale import nqm

SETTINGS = (
    nqm.OptimizerSetting(),
    nqm.OptimizerSetting(momentum=0.9),
    nqm.OptimizerSetting(precondition_power=0.5),
    nqm.OptimizerSetting(precondition_power=1.0),
)
MODELS = {"binned (100 bins)": 100, "exact (d = 10^4)": None}


def sweep(model: nqm.NoisyQuadraticModel) -> list[nqm.ScalingCurve]:
    return [nqm.steps_vs_batch_size(model, setting, 2.0 ** np.arange(21)) for setting in SETTINGS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "bench" / "nqm.csv")
    args = parser.parse_args()
    rows = []
    for name, n_bins in MODELS.items():
        model = nqm.paper_model(n_bins=n_bins)
        sweep(model)  # warm-up: imports and first-call allocations
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sweep(model)
            timings.append(time.perf_counter() - start)
        rows.append({
            "model": name, "directions": model.curvatures.size, "batch_sizes": 21,
            "learning_rates": nqm.DEFAULT_LEARNING_RATES.size + 5, "settings": len(SETTINGS),
            "repeats": args.repeats, "median_s": statistics.median(timings), "min_s": min(timings),
            "max_s": max(timings), "device": platform.processor() or platform.machine(),
            "host_cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        })
        print(f"NQM sweep, 21 batch sizes x {nqm.DEFAULT_LEARNING_RATES.size}+5 learning rates x {len(SETTINGS)} "
              f"settings, {name}: median {statistics.median(timings):.3f} s (min {min(timings):.3f} s, "
              f"max {max(timings):.3f} s, {args.repeats} repeats)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".csv.tmp")
    pd.DataFrame(rows).to_csv(temporary, index=False)
    os.replace(temporary, args.out)  # atomic: a killed run leaves the previous file


if __name__ == "__main__":
    main()
