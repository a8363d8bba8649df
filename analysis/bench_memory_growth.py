"""Benchmark: memory kept from step to step, measured against plain steps in the same run.

A step's peak memory (``bench_per_example.py``) cannot show what a step leaves behind. Here each model of
``bench_per_example.py`` runs ``--steps`` steps, plain and through noisescale (``auto``), and the bytes of the live
tensors (found by Python's garbage collector after a collection, so CPU and CUDA alike) are read after a few warm-up
steps and again after the others: their difference per step should be 0 for both. Until 11c7a1f noisescale kept
every step's records (4.2 MB a step on the 2-layer transformer).

    python analysis/bench_memory_growth.py [--steps 15] [--device cpu|cuda] [--models mlp transformer gpt2 ...]
                                           [--out data/bench/memory_growth.csv]
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import pandas as pd
import torch

from bench_per_example import MODELS, make_cases, noisescale_step, plain_step, zero_grads


def live_tensor_bytes() -> int:
    """Bytes of the storages the live tensors hold, each storage once (views share one)."""
    gc.collect()
    storages = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and not o.is_meta:
            storage = o.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def growth_per_step(step, model, inputs, targets, steps: int, warmup: int = 3) -> float:
    """Bytes of live tensors gained per step between step ``warmup`` and step ``steps``."""
    for _ in range(warmup):
        zero_grads(model)
        step(inputs, targets)
    before = live_tensor_bytes()
    for _ in range(steps - warmup):
        zero_grads(model)
        step(inputs, targets)
    return (live_tensor_bytes() - before) / (steps - warmup)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--out", type=Path, default=Path("data/bench/memory_growth.csv"))
    args = parser.parse_args(argv)
    rows = []
    for name, case in make_cases(torch.device(args.device), args.models).items():
        if isinstance(case, str):
            rows.append({"model": name, "error": case})
            continue
        model, loss_fn, inputs, targets = case
        row = {"model": name}
        for method, make in [("plain", plain_step), ("auto", noisescale_step("auto"))]:
            row[f"{method}_bytes_per_step"] = growth_per_step(make(model, loss_fn), model, inputs, targets,
                                                              args.steps)
        rows.append(row)
        print(row, flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
