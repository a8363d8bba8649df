"""A user's own model, data and loss, as `noisescale measure --model _cli_user_code:make_text_model ...` names them
(importable because pytest and `python -m` put this folder on sys.path)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

VOCAB, LENGTH, CLASSES = 30, 12, 3


class MeanPooledText(nn.Module):
    """Token ids (B, T) -> embedding -> mean over tokens -> linear classifier: logits (B, CLASSES)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 16)
        self.classifier = nn.Linear(16, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(tokens).mean(1))


def make_text_model() -> nn.Module:
    return MeanPooledText()


def _text_examples(count: int, seed: int) -> TensorDataset:
    """Random token ids; the label is the most frequent third of the vocabulary (learnable from the mean pool)."""
    tokens = torch.randint(0, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(seed))
    thirds = torch.stack([(tokens * CLASSES // VOCAB == k).sum(1) for k in range(CLASSES)], 1)
    return TensorDataset(tokens, thirds.argmax(1))


def make_text_data() -> TensorDataset:
    """One dataset of 240 examples: noisescale holds out 10 % for testing."""
    return _text_examples(240, seed=1)


def make_text_splits() -> tuple[TensorDataset, TensorDataset]:
    """A (train, test) pair."""
    return _text_examples(160, seed=1), _text_examples(40, seed=2)


def make_regression_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def make_regression_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(120, 4, generator=generator)
    return TensorDataset(inputs, inputs.sum(1) + 0.1 * torch.randn(120, generator=generator))


def make_regression_data_with_nan_inputs() -> TensorDataset:
    """make_regression_data with NaN in 3 features of example 7 (the commands refuse it)."""
    inputs, targets = (tensor.clone() for tensor in make_regression_data().tensors)
    inputs[7, 1:] = float("nan")
    return TensorDataset(inputs, targets)


def make_regression_data_with_an_inf_target() -> TensorDataset:
    inputs, targets = (tensor.clone() for tensor in make_regression_data().tensors)
    targets[30] = float("-inf")
    return TensorDataset(inputs, targets)


class ExampleByExample(Dataset):
    """A dataset that builds each example when indexed (as one reading files would)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]


def make_lazy_regression_data_with_nan_inputs() -> ExampleByExample:
    return ExampleByExample(make_regression_data_with_nan_inputs())


def make_regression_splits_with_a_nan_test_target() -> tuple[TensorDataset, TensorDataset]:
    """A (train, test) pair whose test set has a NaN target in example 4."""
    inputs, targets = (tensor.clone() for tensor in make_regression_data().tensors)
    targets[100 + 4] = float("nan")
    return TensorDataset(inputs[:100], targets[:100]), TensorDataset(inputs[100:], targets[100:])


def per_example_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.squeeze(-1) - targets).square()


def mean_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A mistake users make: the batch mean instead of one loss per example."""
    return nn.functional.cross_entropy(outputs, targets)


def not_a_module() -> str:
    return "a model"


def make_vectors() -> TensorDataset:
    """Inputs of shape (N, 7): they do not fit the default image model."""
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(50, 7, generator=generator), torch.randint(0, 10, (50,), generator=generator))


def make_unlabelled() -> TensorDataset:
    """Items of one tensor each, not (inputs, targets) pairs."""
    return TensorDataset(torch.randn(50, 7))


def make_text_loaders():
    """A (train, test) pair of DataLoaders with the default collate: noisescale uses their datasets."""
    from torch.utils.data import DataLoader

    train, test = make_text_splits()
    return DataLoader(train, batch_size=10, shuffle=True), DataLoader(test, batch_size=10)


def make_loader_with_own_collate():
    from torch.utils.data import DataLoader

    return DataLoader(make_text_data(), batch_size=10, collate_fn=lambda items: items)
