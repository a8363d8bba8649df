"""Benchmark: cost of per-example gradient norms against a plain training step.

For three models (MLP 784-512-512-10 at B=128, LeNet-5-like CNN on 28x28 at B=128, a 2-layer transformer
with d=128, 4 heads, T=64, vocab 256 at B=32) it times one forward+backward step for

    plain     forward + loss.mean().backward()
    ghost     noisescale, ghost-norm hooks only
    auto      noisescale, ghost where supported, torch.func vmap for the rest
    vmap      noisescale, torch.func vmap(grad) for every parameter
    backpack  BackPACK BatchL2Grad (extend + backward)
    opacus    Opacus GradSampleModule (per-example gradients, then their norms)

and reports the median time over interleaved repetitions after warm-up, and the peak memory of the tensors
the step allocates (a TorchDispatchMode counts live storages, so it works on CPU where torch keeps no
allocator statistics; on CUDA the allocator's peak is used), both as ratios to `plain` measured in the same
run. Peers that cannot be installed or that reject a model are listed with the reason. Each method's
per-example squared norms are also compared with noisescale's `vmap` result (max relative difference).

    python analysis/bench_per_example.py [--repeats 15] [--device cpu|cuda] [--models mlp cnn transformer]
                                         [--out data/bench/per_example.csv]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from noisescale.models import lenet5, mlp, sequence_cross_entropy, tiny_transformer
from noisescale.per_example import PerExampleGradNorms

class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block, autograd's included."""

    def __enter__(self):
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()
        return super().__enter__()

    def _release(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):  # functorch wrappers carry no storage of their own
                continue
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._alive:
                continue
            self._alive.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def classification_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def make_cases(device: torch.device) -> dict[str, tuple[torch.nn.Module, Callable, torch.Tensor, torch.Tensor]]:
    """name -> (model, per-example loss, inputs, targets), seeded."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    images = torch.randn(128, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (128,), generator=generator)
    tokens = torch.randint(0, 256, (32, 65), generator=generator)
    cases = {
        "mlp": (mlp(), classification_loss, images.flatten(1), labels),
        "cnn": (lenet5(), classification_loss, images, labels),
        "transformer": (tiny_transformer(), sequence_cross_entropy, tokens[:, :-1], tokens[:, 1:]),
    }
    return {
        name: (model.to(device), loss_fn, inputs.to(device), targets.to(device))
        for name, (model, loss_fn, inputs, targets) in cases.items()
    }


def plain_step(model, loss_fn):
    def step(inputs, targets):
        loss_fn(model(inputs), targets).mean().backward()

    return step


def noisescale_step(backend: str):
    def make(model, loss_fn):
        engine = PerExampleGradNorms(model, loss_fn, backend=backend)
        return lambda inputs, targets: engine(inputs, targets).sqnorms

    return make


def backpack_step(model, loss_fn):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    if loss_fn is not classification_loss:
        raise NotImplementedError("BatchL2Grad needs a BackPACK-extended loss module; sequence losses are not")
    model, criterion = extend(model), extend(torch.nn.CrossEntropyLoss(reduction="mean"))

    def step(inputs, targets):
        loss = criterion(model(inputs), targets)
        with backpack(BatchL2Grad()):
            loss.backward()
        # BatchL2Grad gives |grad of l_i / B|^2 for a mean loss; rescale to |g_i|^2.
        return sum(p.batch_l2 for p in model.parameters() if p.requires_grad) * inputs.shape[0] ** 2

    return step


def opacus_step(model, loss_fn):
    from opacus import GradSampleModule

    module = GradSampleModule(model, loss_reduction="mean", batch_first=True)

    def step(inputs, targets):
        loss_fn(module(inputs), targets).mean().backward()
        # with loss_reduction="mean" Opacus rescales grad_sample to the per-example gradients g_i themselves
        sqnorms = sum(
            p.grad_sample.reshape(inputs.shape[0], -1).square().sum(1) for p in model.parameters() if p.requires_grad
        )
        for p in model.parameters():  # Opacus accumulates grad_sample across steps unless it is cleared
            p.grad_sample = None
        return sqnorms

    return step


def available_methods() -> tuple[dict[str, Callable], dict[str, str]]:
    """Step factories (model, loss_fn) -> step(inputs, targets) of the methods that can run here, and why
    the others cannot."""
    factories = {"plain": plain_step, **{b: noisescale_step(b) for b in ("ghost", "auto", "vmap")}}
    missing = {}
    for name, factory, module in (("backpack", backpack_step, "backpack"), ("opacus", opacus_step, "opacus")):
        try:
            __import__(module)
            factories[name] = factory
        except ImportError as error:
            missing[name] = f"not installed ({error}); see README: pip install -c constraints '.[bench]'"
    return factories, missing


def zero_grads(model: torch.nn.Module) -> None:
    model.zero_grad(set_to_none=True)


def measure_peak(step, model, inputs, targets, device) -> int:
    zero_grads(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(inputs, targets)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakTensorMemory() as tracker:
        step(inputs, targets)
    return tracker.peak


def time_once(step, model, inputs, targets, device) -> float:
    zero_grads(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(inputs, targets)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def max_relative_difference(sqnorms: torch.Tensor | None, reference: torch.Tensor | None) -> float:
    if sqnorms is None or reference is None:
        return float("nan")
    return ((sqnorms.detach().double() - reference.double()).abs() / reference.double().abs()).max().item()


def bench_model(name, case, factories, repeats, warmup, device) -> list[dict]:
    """Every method on its own copy of the model (peers and hooks modify the model they wrap)."""
    model, loss_fn, inputs, targets = case
    prepared, failures, sqnorms = {}, {}, {}
    for method, factory in factories.items():  # set-up, warm-up and failure detection
        copy = deepcopy(model)
        try:
            step = factory(copy, loss_fn)
            for _ in range(warmup):
                zero_grads(copy)
                sqnorms[method] = step(inputs, targets)
            prepared[method] = (step, copy)
        except Exception as error:  # a peer rejecting a model is a result to report, not a crash
            failures[method] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    times = {method: [] for method in prepared}
    for _ in tqdm(range(repeats), desc=name, leave=False):  # interleaved: load drifts hit every method alike
        for method, (step, copy) in prepared.items():
            times[method].append(time_once(step, copy, inputs, targets, device))
    peaks = {method: measure_peak(step, copy, inputs, targets, device) for method, (step, copy) in prepared.items()}
    plain_time, plain_peak = statistics.median(times["plain"]), peaks["plain"]
    rows = []
    for method in factories:
        row = {"model": name, "method": method, "parameters": sum(p.numel() for p in model.parameters())}
        if method in prepared:
            median = statistics.median(times[method])
            row |= {
                "median_ms": 1e3 * median,
                "time_ratio": median / plain_time,
                "peak_mb": peaks[method] / 2**20,
                "memory_ratio": peaks[method] / plain_peak,
                "max_rel_diff_vs_vmap": max_relative_difference(sqnorms.get(method), sqnorms.get("vmap")),
                "status": "ok",
            }
        else:
            row["status"] = failures[method]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"],
                        choices=["mlp", "cnn", "transformer"])
    parser.add_argument("--out", type=Path, default=Path("data/bench/per_example.csv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    factories, missing = available_methods()
    rows = []
    for name, case in make_cases(device).items():
        if name not in args.models:
            continue
        rows += bench_model(name, case, factories, args.repeats, args.warmup, device)
        rows += [{"model": name, "method": method, "status": why} for method, why in missing.items()]
    table = pd.DataFrame(rows)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    table["device"] = machine
    table["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    shown = table[["model", "method", "median_ms", "time_ratio", "peak_mb", "memory_ratio", "max_rel_diff_vs_vmap", "status"]]
    print(f"device: {machine}; torch {torch.__version__}; median of {args.repeats} interleaved repeats")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
