"""Benchmark: the cost of per-example gradient norms against a plain step as the model widens.

A measured call pays a fixed cost per layer (hooks, checks, small operations: ``bench_call_overhead.py``) and the
norms' arithmetic, which grows with the layer; on the small models of ``bench_per_example.py`` the first weighs
most. This runs that script's ``plain`` and ``auto`` steps (same timing, flop count and peak memory) on

- HF GPT-2 with its own vocabulary of 50257, tied to the output layer (2 layers, one head per 64 dims, T = 128,
  B = 8, random weights, nothing downloaded) at widths 64 to 768 (GPT-2 small's);
- ``bench_per_example``'s VGG-style CNN (3x32x32 images, B = 64) at widths 16 to 64,

and prints the ratios per width.

    python analysis/bench_width.py [--repeats 7] [--warmup 2] [--threads 1] [--families gpt2 vgg]
                                   [--out data/bench/width.csv]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import pandas as pd
import torch

from bench_per_example import (bench_model, causal_lm_loss, classification_loss, image_batch, noisescale_step,
                               plain_step, vgg_cnn)
from noisescale.checkpoints import atomic_write

WIDTHS = {"gpt2": (64, 128, 256, 512, 768), "vgg": (16, 32, 64)}
GPT2_BATCH, GPT2_LENGTH = 8, 128


def gpt2_case(width: int) -> tuple:
    import transformers
    config = transformers.GPT2Config(n_layer=2, n_embd=width, n_head=max(1, width // 64), n_positions=GPT2_LENGTH,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tokens = torch.randint(0, config.vocab_size, (GPT2_BATCH, GPT2_LENGTH),
                           generator=torch.Generator().manual_seed(0))
    return transformers.GPT2LMHeadModel(config), causal_lm_loss, {"input_ids": tokens}, tokens


def vgg_case(width: int) -> tuple:
    return vgg_cnn(width), classification_loss, *image_batch()


CASES = {"gpt2": gpt2_case, "vgg": vgg_case}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--out", type=Path, default=Path("data/bench/width.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, methods = torch.device("cpu"), {"plain": plain_step, "auto": noisescale_step("auto")}
    rows = []
    for family in args.families:
        for width in WIDTHS[family]:
            torch.manual_seed(0)
            plain, auto = bench_model(f"{family}_{width}", CASES[family](width), methods, args.repeats, args.warmup,
                                      device)
            rows.append(auto | {"family": family, "width": width, "plain_ms": plain["median_ms"]})
    table = pd.DataFrame(rows).assign(threads=args.threads, device=platform.processor() or platform.machine(),
                                      torch=torch.__version__)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out, newline="") as handle:   # a killed run leaves the previous file
        table.to_csv(handle, index=False)
    shown = table[["family", "width", "parameters", "plain_ms", "median_ms", "time_ratio", "flop_ratio",
                   "memory_ratio", "status"]]
    print(f"auto against plain, {args.threads} thread(s), median of {args.repeats} interleaved repeats")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return table


if __name__ == "__main__":
    main()
