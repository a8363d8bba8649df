"""Coverage of ``noisescale.tradeoff.fit_tradeoff``'s intervals on simulated sweeps with known S_min and B_crit.

Each sweep: batch sizes 8 .. 2048 (doubling), steps S_min (1 + B_crit / B) times log-normal scatter of sd ``--sd``
(the CNN sweep's log residual sd is 0.13); the fit's 90 % intervals of S_min, E_min and B_crit are checked against
the truth. A statistical check, not a test: prints the coverage with its binomial standard error.

    python3 analysis/tradeoff_coverage.py [--seed 1] [--sweeps 1600] [--sd 0.13] [--replicates 400]
"""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
from tqdm.auto import tqdm

from noisescale.tradeoff import fit_tradeoff

BATCH_SIZES = 2.0 ** np.arange(3, 12)
S_MIN, B_CRIT = 75.0, 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sweeps", type=int, default=1600)
    parser.add_argument("--sd", type=float, default=0.13)
    parser.add_argument("--replicates", type=int, default=400, help="bootstrap replicates per fit")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    truth = {"S_min": S_MIN, "E_min": S_MIN * B_CRIT, "B_crit": B_CRIT}
    covered = dict.fromkeys(truth, 0)
    unresolved = 0
    for sweep in tqdm(range(args.sweeps), desc="sweeps"):
        steps = S_MIN * (1 + B_CRIT / BATCH_SIZES) * np.exp(args.sd * rng.standard_normal(BATCH_SIZES.size))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # an unresolved or extrapolated fit: counted below
            fit = fit_tradeoff(BATCH_SIZES, steps, n_bootstrap=args.replicates, seed=sweep)
        unresolved += not fit.resolved
        for name, interval in (("S_min", fit.s_min_interval), ("E_min", fit.e_min_interval),
                               ("B_crit", fit.b_crit_interval)):
            covered[name] += interval[0] <= truth[name] <= interval[1]
    error = math.sqrt(0.9 * 0.1 / args.sweeps)
    shown = ", ".join(f"{name} {count / args.sweeps:.3f}" for name, count in covered.items())
    print(f"{args.sweeps} sweeps, sd {args.sd}, {args.replicates} replicates, seed {args.seed}: coverage of the 90 % "
          f"intervals {shown} (binomial SE {error:.3f}); unresolved fits {unresolved}")


if __name__ == "__main__":
    main()
