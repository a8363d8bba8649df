"""Time one figure's sweep of the noisy quadratic model: batch sizes 2^0..2^20, the default learning-rate
grid, four optimizer settings (SGD, momentum 0.9, p = 0.5, p = 1) on the paper's model (d = 10^4, 100 bins).

Usage: python3 analysis/bench_nqm.py [--repeats 5]   (prints the median wall time of the repeats)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from noisescale import nqm

SETTINGS = (
    nqm.OptimizerSetting(),
    nqm.OptimizerSetting(momentum=0.9),
    nqm.OptimizerSetting(precondition_power=0.5),
    nqm.OptimizerSetting(precondition_power=1.0),
)


def sweep(model: nqm.NoisyQuadraticModel) -> list[nqm.ScalingCurve]:
    return [nqm.steps_vs_batch_size(model, setting, 2.0 ** np.arange(21)) for setting in SETTINGS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = nqm.paper_model()
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sweep(model)
        timings.append(time.perf_counter() - start)
    print(f"NQM sweep, 21 batch sizes x {nqm.DEFAULT_LEARNING_RATES.size}+5 learning rates x {len(SETTINGS)} "
          f"settings, {model.curvatures.size} bins: median {statistics.median(timings):.3f} s "
          f"(min {min(timings):.3f} s, {args.repeats} repeats)")


if __name__ == "__main__":
    main()
