"""Benchmark: a convolution's per-example kernel-gradient norms by im2col against one grouped convolution.

``ConvRule`` (noisescale/per_example/layers.py) takes per-example squared norms of a convolution's kernel gradients
either from im2col patches (the Gram form, or the materialised gradients by ``bmm``) or, where the gradients are
materialised, from the weight gradient of one convolution with the examples as its groups (Rochette et al. 2019).
This script times both on single layers (random input and output gradient, float32, the rule's own code; not a
training step), over a grid of input channels, output channels, map size, kernel and stride and some wider layers,
and prints the grouped form's time as a ratio of im2col's measured in the same run (medians of interleaved
repeats), with the form the rule takes (``rule_takes``). Its findings set the rule's threshold of input channels
per group (``_GROUPED_MIN_CHANNELS``) and its margin over the Gram form (``_GRAM_MARGIN``).

    python analysis/bench_conv_rule.py [--repeats 7] [--batch 64] [--threads 1] [--out data/bench/conv_rule.csv]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from noisescale.checkpoints import atomic_write
from noisescale.per_example.factors import gram_preferred, per_example_sqnorm
from noisescale.per_example.layers import ConvRule

IN_CHANNELS, OUT_CHANNELS, SIZES, KERNELS, STRIDES = (1, 3, 8, 16, 32, 64), (16, 64), (8, 16, 32), (3, 5), (1, 2)
# (in, out, size, kernel, stride) beyond the grid: VGG's wider layers, and many output channels on few inputs
EXTRA_SHAPES = ((128, 128, 16, 3, 1), (128, 256, 8, 3, 1), (256, 256, 8, 3, 1), (8, 1024, 9, 3, 1),
                (16, 512, 12, 3, 1))


def im2col(layer, x, g):
    rule = ConvRule()
    rule.grouped_kernels = False
    return rule.per_example_sqnorms(layer, x, g, {"weight"})["weight"]


def im2col_form(positions: int, n: int, out: int) -> str:
    """The form ``position_weight_sqnorms`` takes on the patches: "gram" (fewer multiply-adds), "gram (memory)" (more,
    taken for the materialised gradients' memory), or "materialised"."""
    if not gram_preferred(positions, n, out):
        return "materialised"
    return "gram" if positions * (n + out) < n * out else "gram (memory)"


def grouped(layer, x, g):
    """The grouped convolution over the rule's chunks, whatever the layer's channels (the rule takes it from
    _GROUPED_MIN_CHANNELS on)."""
    return torch.cat([per_example_sqnorm(ConvRule._kernel_grads(layer, xc, gc))
                      for xc, gc in ConvRule._example_chunks(layer, x, g, grouped=True)])


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_layer(in_channels, out_channels, size, kernel, stride, batch, repeats) -> dict:
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
    x = torch.randn(batch, in_channels, size, size, generator=generator)
    with torch.no_grad():
        g = torch.randn(layer(x).shape, generator=generator)
    difference = ((grouped(layer, x, g) - im2col(layer, x, g)).abs() / im2col(layer, x, g)).max().item()
    times = {"im2col": [], "grouped": []}
    for _ in range(repeats):   # interleaved: load drifts hit both alike
        times["im2col"].append(seconds(lambda: im2col(layer, x, g)))
        times["grouped"].append(seconds(lambda: grouped(layer, x, g)))
    return {"in_channels": in_channels, "out_channels": out_channels, "size": size, "kernel": kernel,
            "stride": stride, "batch": batch, "im2col_form": im2col_form(g.shape[2] * g.shape[3],
                                                                        in_channels * kernel * kernel, out_channels),
            "rule_takes": "grouped" if ConvRule().takes_grouped_norms(layer, x, g) else "im2col",
            "im2col_ms": 1e3 * statistics.median(times["im2col"]),
            "grouped_ms": 1e3 * statistics.median(times["grouped"]), "max_rel_diff": difference}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("data/bench/conv_rule.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [shape for shape in itertools.product(IN_CHANNELS, OUT_CHANNELS, SIZES, KERNELS, STRIDES)
              if not (shape[3] == 5 and shape[4] == 2)] + list(EXTRA_SHAPES)
    rows = [bench_layer(*shape, args.batch, args.repeats) for shape in tqdm(shapes, desc="layers")]
    frame = pd.DataFrame(rows).assign(threads=args.threads)
    frame["grouped_ratio"] = frame.grouped_ms / frame.im2col_ms
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out, newline="") as handle:   # a killed run leaves the previous file
        frame.to_csv(handle, index=False)
    summary = frame.groupby(["in_channels", "im2col_form", "rule_takes"]).grouped_ratio.describe()[
        ["count", "min", "50%", "max"]]
    print(summary.to_string(float_format=lambda v: f"{v:.2f}"))
    return frame


if __name__ == "__main__":
    main()
