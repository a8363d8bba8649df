"""What the command-line options name, resolved and checked before any training starts.

Every check raises :class:`UsageError` with one line that names the option and its value
(``--model 'mypkg.mod:make': the factory returned a str, not a torch.nn.Module``); :func:`noisescale.app.cli.main`
prints it as ``noisescale: error: <line>`` and exits with status 2.

User data (``--dataset package.module:factory``): the factory is called without arguments and returns

- a map-style ``torch.utils.data.Dataset`` (``len`` and ``dataset[i]``) whose items are ``(inputs, targets)``
  pairs; a seeded 10 % of it (at least one example, ``--seed``) is held out as the test set;
- or a ``(train, test)`` pair of such datasets;
- or a ``DataLoader`` (or a pair of them) with the default collate function: its dataset is used, since
  noisescale draws its own batches (the batch size is what it measures and changes).

``inputs`` is a tensor, a tuple of positional inputs or a mapping of keyword inputs of the model
(:mod:`noisescale.batches`); ``targets`` is what the per-example loss takes. Their floating values must be finite:
a dataset holding NaN, or Inf in its targets, is refused before training (:func:`check_finite_data`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate, random_split

from noisescale._modes import eval_mode
from noisescale.batches import batch_size_of, call_model, fetch_examples, nonfinite_values, to_device
from noisescale.checkpoints import exclusive_lock
from noisescale.devices import resolve_device

DEFAULT_MODEL = "noisescale.models:lenet5"
DEFAULT_LOSS = "noisescale.losses:per_example_cross_entropy"
FASHION_MNIST_SOURCES = ("auto", "subset", "debian")
HELD_OUT_SHARE = 0.1  # of a single user dataset, held out as its test set
DEFAULT_THREADS: int | None = None  # torch threads of the commands; None leaves torch's own default (one per core,
# with OMP_WAIT_POLICY=PASSIVE set by cli.main so that a busy machine degrades gracefully)


class UsageError(Exception):
    """A command-line option that cannot be used as given: one line naming the option, its value and the cause."""


def option_error(flag: str, value: Any, reason: str) -> UsageError:
    return UsageError(f"{flag} {str(value)!r}: {reason}")


def one_line(error: BaseException) -> str:
    """``Type: message`` of an exception on one line (whitespace and newlines collapsed)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------- callables
def load_callable(spec: str, flag: str) -> Callable:
    """``"package.module:name"`` -> the callable it names; the current directory is importable, as for
    ``python -m``."""
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise option_error(flag, spec, "expected 'package.module:name'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise option_error(flag, spec, f"cannot import module {module_name!r}: {one_line(error)}") from error
    target = getattr(module, attribute, None)
    if target is None:
        raise option_error(flag, spec, f"module {module_name!r} has no attribute {attribute!r}")
    if not callable(target):
        raise option_error(flag, spec, f"{attribute!r} is a {type(target).__name__}, not a callable")
    return target


def _call_factory(factory: Callable, flag: str, spec: str) -> Any:
    try:
        return factory()
    except Exception as error:
        raise option_error(flag, spec, f"calling the factory failed with {one_line(error)}") from error


def build_model(spec: str) -> torch.nn.Module:
    """The model a ``--model`` factory returns (called without arguments)."""
    model = _call_factory(load_callable(spec, "--model"), "--model", spec)
    if not isinstance(model, torch.nn.Module):
        raise option_error("--model", spec, f"the factory returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise option_error("--model", spec, "the model has no trainable parameters")
    return model


def load_loss(spec: str) -> Callable[[Any, Any], torch.Tensor]:
    """The per-example loss ``--loss`` names: ``loss(outputs, targets)`` -> shape (B,)."""
    return load_callable(spec, "--loss")


# ---------------------------------------------------------------------------------------------- devices
def resolve_device_option(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...; a device
    that torch does not know or this machine does not have is an error."""
    if name == "auto":
        return resolve_device(name)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise option_error("--device", name, "not a torch device name (use auto, cpu, cuda or cuda:N)") from error
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise option_error("--device", name, "CUDA is not available on this machine (use auto or cpu)")
        if device.index is not None and device.index >= count:
            raise option_error("--device", name, f"this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}")
        return device
    backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        raise option_error("--device", name, f"{device.type} is not available on this machine (use auto or cpu)")
    return device


def set_threads(threads: int | None) -> None:
    """``--threads N``: torch.set_num_threads(N); None leaves torch's default."""
    if threads is None:
        return
    if threads < 1:
        raise option_error("--threads", threads, "must be >= 1")
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- outputs
def prepare_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Create the folder (and parents) and check that a file can be written in it, before any training."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".noisescale-write-check-"):
            pass
    except FileExistsError as error:
        raise option_error(flag, path, "exists and is not a folder") from error
    except NotADirectoryError as error:
        raise option_error(flag, path, "a part of the path is a file, not a folder") from error
    except OSError as error:
        raise option_error(flag, path, f"cannot write there: {error.strerror or one_line(error)}") from error
    return path


@contextlib.contextmanager
def locked_output_folder(path: str | Path, flag: str = "--out") -> Iterator[Path]:
    """The output folder, prepared (:func:`prepare_output_folder`) and held by this run alone for the block: a
    second command writing to it meanwhile is refused at once, before any training or file is written
    (``<folder>/.noisescale.lock``, :func:`noisescale.checkpoints.exclusive_lock`)."""
    path = prepare_output_folder(path, flag)
    with _held(path / ".noisescale.lock", flag, path):
        yield path


@contextlib.contextmanager
def locked_output_file(path: str | Path, flag: str) -> Iterator[Path]:
    """A file this run writes outside its output folder (``train --checkpoint``), its folder prepared
    (:func:`prepare_output_file`) and the file held by this run alone for the block (``<folder>/.<name>.lock``):
    two runs given one checkpoint path would otherwise overwrite each other's checkpoints, and a resume would load
    the other run's."""
    path = prepare_output_file(path, flag)
    with _held(path.parent / f".{path.name}.lock", flag, path):
        yield path


@contextlib.contextmanager
def _held(lock_path: Path, flag: str, path: Path) -> Iterator[None]:
    """``lock_path`` held for the block, or a UsageError at once naming ``flag`` and ``path``."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(lock_path, f"{flag} {str(path)!r} is in use by another noisescale run, "
                                              f"which holds the lock {lock_path}: wait for it to end, or give this "
                                              f"run another {flag}"))
        except RuntimeError as error:
            raise UsageError(str(error)) from None
        yield


def prepare_output_file(path: str | Path, flag: str) -> Path:
    """The parent folder of a file to be written, created and checked (:func:`prepare_output_folder`)."""
    path = Path(path)
    if path.is_dir():
        raise option_error(flag, path, "is a folder; name a file")
    prepare_output_folder(path.parent, flag)
    return path


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class JobData:
    train: Dataset
    test: Dataset
    description: str  # printed as "data: <description>"
    users: tuple[tuple[str, Dataset], ...] = ()  # the user's datasets as the factory returned them, named


def load_job_data(dataset: str | None, data: str | None, seed: int) -> JobData:
    """``--dataset package.module:factory`` (module docstring), else Fashion-MNIST from ``--data``."""
    if dataset is None:
        return load_fashion_mnist_option(data)
    if data not in (None, "auto"):
        raise option_error("--data", data, "names Fashion-MNIST files; it cannot be combined with --dataset")
    result = _call_factory(load_callable(dataset, "--dataset"), "--dataset", dataset)
    if isinstance(result, (tuple, list)) and len(result) == 2 and not _is_example(result):
        train, test = (_as_dataset(part, dataset, name) for part, name in zip(result, ("training set", "test set")))
        users = (("training set", train), ("test set", test))
        held_out = ""
    else:
        whole = _as_dataset(result, dataset, "dataset")  # names as in "item 0 of the dataset"
        test_size = max(1, round(HELD_OUT_SHARE * len(whole)))
        if len(whole) - test_size < 2:
            raise option_error("--dataset", dataset, f"has {len(whole)} examples; at least {test_size + 2} are "
                               "needed to hold out a test set")
        train, test = random_split(whole, [len(whole) - test_size, test_size],
                                   generator=torch.Generator().manual_seed(seed))
        users = (("dataset", whole),)
        held_out = f", {HELD_OUT_SHARE:.0%} held out with --seed {seed}"
    return JobData(train, test, f"{dataset}, {len(train)} training / {len(test)} test examples{held_out}", users)


def _is_example(value: Any) -> bool:
    """An (inputs, targets) pair of tensors (one example), as opposed to a (train, test) pair of datasets."""
    return any(isinstance(part, (torch.Tensor, Mapping)) for part in value)


def _as_dataset(value: Any, spec: str, name: str) -> Dataset:
    if isinstance(value, DataLoader):
        if value.collate_fn is not default_collate:
            raise option_error("--dataset", spec, f"the {name} DataLoader has its own collate_fn; return its Dataset "
                               "of already-collatable (inputs, targets) items instead")
        value = value.dataset
    if isinstance(value, IterableDataset) or not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        raise option_error("--dataset", spec, f"the {name} is a {type(value).__name__}; expected a map-style "
                           "Dataset (len and indexing) of (inputs, targets) pairs, or a (train, test) pair of them")
    if len(value) == 0:
        raise option_error("--dataset", spec, f"the {name} is empty")
    first = value[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        described = f"a {len(first)}-item {type(first).__name__}" if isinstance(first, (tuple, list)) else \
            f"a {type(first).__name__}"
        raise option_error("--dataset", spec, f"item 0 of the {name} is {described}; expected an "
                           "(inputs, targets) pair")
    return value


def load_fashion_mnist_option(data: str | None) -> JobData:
    """``--data``: auto (a Debian copy when installed, else the shipped subset), subset, debian or a folder of
    Fashion-MNIST/MNIST IDX files."""
    from noisescale.data import load_fashion_mnist

    value = data or "auto"
    try:
        if value in FASHION_MNIST_SOURCES:
            train, test = load_fashion_mnist(source=value)
        else:
            train, test = load_fashion_mnist(value)
    except ValueError as error:
        raise option_error("--data", value, " ".join(str(error).split())) from error
    info = train.info
    return JobData(train, test, f"{info.name}, {info.n_train} training / {info.n_test} test images "
                                f"({info.source}: {info.path})")


# ---------------------------------------------------------------------------------------------- batches
def check_first_batch(model: torch.nn.Module, loss_fn: Callable, dataset: Dataset, device: torch.device,
                      specs: Mapping[str, str]) -> None:
    """Run the model and the loss on two training examples (eval mode, no gradient, no random numbers drawn) so
    that a model, data and loss that do not fit together fail before training, with the options to check."""
    named = ", ".join(f"{flag} {value!r}" for flag, value in specs.items())
    try:
        inputs, targets = fetch_examples(dataset, torch.arange(min(2, len(dataset))))
    except Exception as error:
        raise UsageError(f"cannot make a batch of the first two training examples: {one_line(error)}; check "
                         f"{named}") from error
    described = _shapes(inputs)
    with eval_mode(model):
        with torch.no_grad():
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            try:
                count = batch_size_of(inputs)
            except (TypeError, ValueError) as error:
                raise UsageError(f"the examples' inputs {described} are not a batch noisescale can call the model "
                                 f"on: {one_line(error)}; check {named}") from error
            try:
                outputs = call_model(model, inputs)
            except Exception as error:
                raise UsageError(f"the model cannot run on the data (inputs {described}): {one_line(error)}; check "
                                 f"that {named} fit together") from error
            try:
                losses = loss_fn(outputs, targets)
            except Exception as error:
                raise UsageError(f"the loss cannot take the model's outputs {_shapes(outputs)} and targets "
                                 f"{_shapes(targets)}: {one_line(error)}; check {named}") from error
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (count,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise UsageError(f"--loss {specs.get('--loss', DEFAULT_LOSS)!r}: returned {shape} for {count} examples; a "
                         f"per-example loss returns shape ({count},), one loss per example (reduction='none')")


def check_finite_data(data: JobData, spec: str, chunk: int = 4096) -> None:
    """Refuse ``--dataset`` data in memory (a ``TensorDataset``) holding NaN, or Inf in its targets, before any
    training or file (``nonfinite_values``: Inf in the inputs can be meant, a mask's -inf): training on it gives
    non-finite losses that skipped steps would hide. Names the first such example (the index into the dataset as
    the factory returned it), the tensor and the position inside the example, ``chunk`` examples at a time. Another
    dataset is not read ahead (it may load every example from disk): a batch of it holding such values is named by
    the monitor when a step meets it."""
    for name, dataset in data.users:
        if not isinstance(dataset, TensorDataset):
            continue
        for start in range(0, len(dataset), chunk):
            stop = min(start + chunk, len(dataset))
            found = nonfinite_values(*fetch_examples(dataset, torch.arange(start, stop)))
            if not found:
                continue
            first = min(found, key=lambda values: values.first[:1])
            position = f", at {list(first.first[1:])}" if len(first.first) > 1 else ""
            raise option_error("--dataset", spec, f"example {start + first.first[0]} of the {name} is the first to "
                               f"hold NaN or Inf (its {first.part}{first.tensor}{position}); its examples "
                               f"{start} to {stop - 1} hold {' and '.join(map(str, found))}. Training on them gives "
                               "non-finite losses: remove or fix those values (drop the examples, or "
                               "torch.nan_to_num) and run again")


def _shapes(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {_shapes(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shapes(item) for item in value) + ")"
    return type(value).__name__
