"""The ready-made jobs behind the command line.

``measure``: train a model (the default LeNet-5-like CNN on the shipped Fashion-MNIST subset) for a few hundred
steps of SGD with momentum while a :class:`~noisescale.monitor.NoiseScaleMonitor` measures B_simple every step
and B_noise periodically; write the history as CSV and a figure as PNG, and return the summary.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from noisescale.data import load_fashion_mnist
from noisescale.models import lenet5
from noisescale.monitor import NoiseScaleMonitor, NoiseScaleSummary


def per_example_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example classification loss, shape (B,): the mean of it is the usual cross-entropy."""
    return F.cross_entropy(outputs, targets, reduction="none")


def load_model_factory(spec: str | None) -> Callable[[], torch.nn.Module]:
    """``"package.module:factory"`` -> the factory (a callable returning an nn.Module); None -> the default CNN."""
    if spec is None:
        return lenet5
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"--model must look like 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--model {spec!r}: cannot load {attribute!r} from module {module_name!r}: {error}") from error
    if not callable(factory):
        raise TypeError(f"--model {spec!r}: {attribute!r} is a {type(factory).__name__}, not a callable")
    return factory


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


@dataclass(frozen=True)
class MeasureOutcome:
    summary: NoiseScaleSummary
    test_accuracy: float
    data_source: str
    history_csv: Path
    figure_png: Path
    seconds: float


def evaluate_accuracy(model: torch.nn.Module, dataset, device: torch.device, batch_size: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for inputs, targets in DataLoader(dataset, batch_size=batch_size):
            correct += (model(inputs.to(device)).argmax(1) == targets.to(device)).sum().item()
    model.train(was_training)
    return correct / len(dataset)


def _describe(info) -> str:
    return f"{info.name}, {info.n_train} training / {info.n_test} test images ({info.source}: {info.path})"


def run_measure(
    *,
    model_spec: str | None = None,
    data: str | None = None,
    batch_size: int = 128,
    steps: int = 300,
    learning_rate: float = 0.02,
    momentum: float = 0.9,
    device: str = "auto",
    backend: str = "auto",
    hessian_every: int = 50,
    out_dir: str | Path = "runs/measure",
    seed: int = 0,
    progress: bool = True,
) -> MeasureOutcome:
    """Train while measuring (module docstring). Deterministic for a given seed on CPU."""
    if batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2 to estimate a gradient variance, got {batch_size}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    target_device = resolve_device(device)
    train, test = load_fashion_mnist(data)
    model = load_model_factory(model_spec)().to(target_device)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    monitor = NoiseScaleMonitor(model, per_example_cross_entropy, backend=backend, hessian_every=hessian_every,
                                seed=seed)
    with monitor, tqdm(total=steps, desc="measure", disable=not progress) as bar:
        while monitor.step < steps:
            for inputs, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = monitor(inputs.to(target_device), targets.to(target_device))
                optimizer.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", b_simple=f"{monitor.average.b_simple:.4g}")
                if monitor.step >= steps:
                    break
    out_dir = Path(out_dir)
    history_csv = monitor.to_csv(out_dir / "measure_history.csv")
    from noisescale.plot import plot_noise_scale_history, save_figure

    figure_png = save_figure(plot_noise_scale_history(monitor.history), out_dir / "measure.png")
    return MeasureOutcome(
        summary=monitor.summary(),
        test_accuracy=evaluate_accuracy(model, test, target_device),
        data_source=_describe(train.info),
        history_csv=history_csv,
        figure_png=figure_png,
        seconds=time.perf_counter() - start,
    )
