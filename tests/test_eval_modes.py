"""Evaluations inside training put every module back in its own mode: ``model.train(was_training)`` switched on
the submodules a user keeps in eval mode (a frozen dropout or BatchNorm), and so changed the training after it.
Reference: the same evaluation by hand under ``model.eval()`` on a copy, and each module's mode before."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from noisescale.app.jobs import evaluate
from noisescale.branching import LanguageModelSettings, validation_loss
from noisescale.models import sequence_cross_entropy
from noisescale.monitor import NoiseScaleMonitor
from noisescale.text import ByteCorpus


class ByteModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.drop, self.head = nn.Embedding(256, 8), nn.Dropout(0.5), nn.Linear(8, 256)

    def forward(self, x):
        return self.head(self.drop(self.embedding(x)))


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _model_with_a_frozen_dropout() -> ByteModel:
    torch.manual_seed(0)
    model = ByteModel().train()
    model.drop.eval()
    return model


def test_validation_loss_keeps_each_modules_mode():
    data = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(1))
    corpus = ByteCorpus(train=data[:300], validation=data[300:], source="random bytes")
    settings = LanguageModelSettings(block_size=8, batch_size=4, validation_windows=4)
    model = _model_with_a_frozen_dropout()
    modes, reference = _modes(model), copy.deepcopy(model).eval()

    loss = validation_loss(model, corpus, settings)

    assert _modes(model) == modes
    inputs, targets = corpus.validation_windows(8, 4)
    with torch.no_grad():
        assert loss == pytest.approx(float(sequence_cross_entropy(reference(inputs), targets).mean()), rel=1e-6)


def test_evaluate_keeps_each_modules_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    model[1].eval()   # frozen statistics
    modes, reference = _modes(model), copy.deepcopy(model).eval()
    inputs, targets = torch.randn(10, 4), torch.randint(0, 3, (10,))

    def loss_fn(outputs, labels):
        return nn.functional.cross_entropy(outputs, labels, reduction="none")

    result = evaluate(model, loss_fn, TensorDataset(inputs, targets), torch.device("cpu"), batch_size=4)

    assert _modes(model) == modes
    with torch.no_grad():
        expected = float(loss_fn(reference(inputs), targets).double().mean())
    assert abs(result.loss - expected) < 1e-6


class MergingLoRA(nn.Linear):
    """loralib's LoRA Linear with merge_weights=True: ``eval()`` adds B A into the weight, ``train()`` takes it out."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out)
        self.lora_A = nn.Parameter(torch.randn(2, d_in) * 0.5)
        self.lora_B = nn.Parameter(torch.randn(d_out, 2) * 0.5)
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode == self.merged:
            with torch.no_grad():
                self.weight += (-1 if mode else 1) * self.lora_B @ self.lora_A
            self.merged = not mode
        return self

    def forward(self, x):
        out = nn.functional.linear(x, self.weight, self.bias)
        return out if self.merged else out + x @ self.lora_A.t() @ self.lora_B.t()


def test_a_module_with_its_own_train_method_trains_as_without_the_monitor():
    """The monitor's first call checks in eval mode that the losses are per example. Setting the flags directly
    both ways (a review's finding: eval() ran the layer's merge, the flag alone was put back, and its LoRA factors
    then got no gradient, 0.70 off after 3 steps) leaves the layer as it was. Reference: plain training."""
    inputs, targets = torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 1, 2])

    def loss_fn(outputs, labels):
        return nn.functional.cross_entropy(outputs, labels, reduction="none")

    runs = []
    for monitored in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(MergingLoRA(4, 8), nn.Tanh(), nn.Linear(8, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        monitor = NoiseScaleMonitor(model, loss_fn) if monitored else None
        for _ in range(3):
            optimizer.zero_grad()
            if monitor is None:
                loss_fn(model(inputs), targets).mean().backward()
            else:
                monitor(inputs, targets)
            optimizer.step()
        assert not model[0].merged
        runs.append([p.detach().clone() for p in model.parameters()])
    for plain, measured in zip(*runs):
        assert torch.equal(plain, measured)
