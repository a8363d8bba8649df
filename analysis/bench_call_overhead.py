"""Benchmark: the fixed cost of one ``PerExampleGradNorms`` call, on MLPs small enough that the arithmetic of the
norms is negligible (every Linear sees one position per example: |a|^2 |g|^2), so what the call adds to a plain
step is its hooks and bookkeeping.

Plain step (forward, per-example cross-entropy, mean, backward) and measured step alternate; medians over
``--repeats`` pairs after warm-up, on one thread. Prints the extra milliseconds and the ratio per model and writes
them to ``--out``.

    PYTHONPATH=. python analysis/bench_call_overhead.py [--repeats 300] [--out data/bench/call_overhead.csv]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from noisescale.checkpoints import atomic_write
from noisescale.per_example import PerExampleGradNorms

# (width, hidden layers, batch): plain steps from about 0.3 ms to about 20 ms
SIZES = ((32, 2, 32), (256, 3, 128), (512, 4, 256))


def _mlp(width: int, depth: int, features: int = 20, classes: int = 4) -> torch.nn.Module:
    layers, d = [], features
    for _ in range(depth):
        layers += [torch.nn.Linear(d, width), torch.nn.ReLU()]
        d = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(d, classes))


def _loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def measure(width: int, depth: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = _mlp(width, depth)
    x, y = torch.randn(batch, 20), torch.randint(0, 4, (batch,))
    norms = PerExampleGradNorms(model, _loss)

    def plain():
        _loss(model(x), y).mean().backward()

    def measured():
        norms(x, y)

    times = {plain: [], measured: []}
    for index in range(repeats + 10):
        for step in (plain, measured) if index % 2 else (measured, plain):   # alternate which goes first
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            if index >= 10:
                times[step].append(time.perf_counter() - start)
    norms.close()
    plain_s, measured_s = statistics.median(times[plain]), statistics.median(times[measured])
    return {"width": width, "hidden_layers": depth, "batch": batch, "plain_ms": 1e3 * plain_s,
            "measured_ms": 1e3 * measured_s, "extra_ms": 1e3 * (measured_s - plain_s),
            "ratio": measured_s / plain_s, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "data" / "bench" / "call_overhead.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for width, depth, batch in SIZES:
        row = measure(width, depth, batch, args.repeats)
        rows.append(row | {"device": platform.processor() or platform.machine(), "torch": torch.__version__})
        print(f"MLP width {width}, {depth} hidden layers, B = {batch}: plain {row['plain_ms']:.3f} ms, measured "
              f"{row['measured_ms']:.3f} ms, extra {row['extra_ms']:.3f} ms, ratio {row['ratio']:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out, newline="") as handle:  # a killed run leaves the previous file
        pd.DataFrame(rows).to_csv(handle, index=False)


if __name__ == "__main__":
    main()
