"""Time one figure's sweep of the noisy quadratic model: batch sizes 2^0..2^20, the default learning-rate
grid, four optimizer settings (SGD, momentum 0.9, p = 0.5, p = 1) on the paper's model (d = 10^4), binned
(100 bins) and on the exact spectrum (10^4 directions), the latter also setting by setting; then the tuned
rows of analysis/nqm_figures.py on the binned model (SGD with momentum tuned over DEFAULT_MOMENTUM_GRID, with
the EMA tuned over DEFAULT_EMA_GRID, and both tuned together, without preconditioning and with p = 1).

Usage: python3 analysis/bench_nqm.py [--repeats 5] [--only TEXT ...] [--out data/bench/nqm.csv]
(prints and writes the median, min and max wall time and the median CPU time of the repeats per job; a
benchmark, not a test: the machine's load shows in the spread). ``--only`` times just the jobs whose name
contains one of the texts, e.g. --only "exact (d = 10^4)" "tuned".
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

BATCH_SIZES = 2.0 ** np.arange(21)
SETTINGS = (
    nqm.OptimizerSetting(),
    nqm.OptimizerSetting(momentum=0.9),
    nqm.OptimizerSetting(precondition_power=0.5),
    nqm.OptimizerSetting(precondition_power=1.0),
)
SWEEPS = {"binned (100 bins)": 100, "exact (d = 10^4)": None}
BOTH = {"momenta": nqm.DEFAULT_MOMENTUM_GRID, "emas": nqm.DEFAULT_EMA_GRID}
TUNED = {  # name: (grids, precondition power p)
    "tuned momentum": ({"momenta": nqm.DEFAULT_MOMENTUM_GRID}, 0.0),
    "tuned EMA": ({"emas": nqm.DEFAULT_EMA_GRID}, 0.0),
    "tuned momentum + EMA": (BOTH, 0.0),
    "tuned momentum + EMA, p = 1": (BOTH, 1.0),
}


def sweep(model: nqm.NoisyQuadraticModel) -> list[nqm.ScalingCurve]:
    return [nqm.steps_vs_batch_size(model, setting, BATCH_SIZES) for setting in SETTINGS]


def jobs():
    """(name, model, settings, configurations per batch size, function) per timed job."""
    rates = nqm.DEFAULT_LEARNING_RATES.size + 5
    for name, n_bins in SWEEPS.items():
        model = nqm.paper_model(n_bins=n_bins)
        yield name, model, len(SETTINGS), rates, lambda model=model: sweep(model)
    exact = nqm.paper_model(n_bins=None)
    for setting in SETTINGS:  # where the exact sweep's time goes
        yield (f"exact (d = 10^4), {setting.label}", exact, 1, rates,
               lambda setting=setting: nqm.steps_vs_batch_size(exact, setting, BATCH_SIZES))
    model = nqm.paper_model()
    for name, (grids, power) in TUNED.items():
        configs = rates * len(grids.get("momenta", (0,))) * len(grids.get("emas", (0,)))
        setting = nqm.OptimizerSetting(precondition_power=power)
        yield (f"{name}, binned (100 bins)", model, 1, configs,
               lambda grids=grids, setting=setting: nqm.steps_vs_batch_size(model, setting, BATCH_SIZES, **grids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="time only the jobs whose name contains a TEXT")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "bench" / "nqm.csv")
    args = parser.parse_args()
    rows = []
    for name, model, settings, configs, job in jobs():
        if args.only and not any(text in name for text in args.only):
            continue
        job()  # warm-up: imports and first-call allocations
        timings, cpu = [], []
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            job()
            timings.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        rows.append({
            "job": name, "directions": model.curvatures.size, "batch_sizes": BATCH_SIZES.size,
            "configurations": configs, "settings": settings, "repeats": args.repeats,
            "median_s": statistics.median(timings), "min_s": min(timings), "max_s": max(timings),
            "median_cpu_s": statistics.median(cpu), "device": platform.processor() or platform.machine(),
            "host_cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        })
        print(f"NQM {name}: {settings} setting(s) x {configs} configurations x {BATCH_SIZES.size} batch sizes: "
              f"median {statistics.median(timings):.3f} s (min {min(timings):.3f} s, max {max(timings):.3f} s, "
              f"CPU {statistics.median(cpu):.3f} s, {args.repeats} repeats)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".csv.tmp")
    pd.DataFrame(rows).to_csv(temporary, index=False)
    os.replace(temporary, args.out)  # atomic: a killed run leaves the previous file


if __name__ == "__main__":
    main()
