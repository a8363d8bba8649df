"""The user-facing surface: the README's API example runs as written, and `noisescale measure` works end to end."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import noisescale.data
from noisescale.cli import main
from noisescale.jobs import load_model_factory

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def shipped_subset_only(monkeypatch, tmp_path):
    """Make the data loader ignore a Debian copy of Fashion-MNIST, as on a fresh machine."""
    monkeypatch.setattr(noisescale.data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-copy")


def test_readme_api_example_runs_and_measures():
    block = re.search(r"## Use it in your own training loop\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    generator = torch.Generator().manual_seed(0)
    loader = [(torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator))
              for _ in range(120)]
    namespace = {"model": model, "loader": loader, "optimizer": torch.optim.SGD(model.parameters(), lr=0.05)}
    exec(compile(block, str(README), "exec"), namespace)
    monitor = namespace["monitor"]
    assert len(monitor.history) == 120
    summary = monitor.summary()
    assert summary.b_simple > 0 and summary.b_noise > 0
    assert monitor.history["trace_h"].notna().sum() == 2  # hessian_every=100: steps 0 and 100


def test_measure_command_end_to_end(tmp_path, capsys, shipped_subset_only):
    out = tmp_path / "run"
    code = main(["measure", "--steps", "12", "--batch-size", "32", "--hessian-every", "5", "--out", str(out),
                 "--no-progress", "--model", "noisescale.models:mlp"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "12000 training" in printed and "B_simple =" in printed and "B_noise" in printed
    history = pd.read_csv(out / "measure_history.csv")
    assert len(history) == 12 and history["examples_seen"].iloc[-1] == 12 * 32
    assert history["b_noise"].notna().sum() == 3
    assert (out / "measure.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("spec", "message"),
    [("no_colon", "package.module:factory"), ("noisescale.models:nothing", "cannot load"),
     ("noisescale.models:__doc__", "not a callable")],
)
def test_model_spec_errors_name_the_problem(spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_model_factory(spec)


def test_measure_rejects_a_batch_of_one(shipped_subset_only):
    with pytest.raises(ValueError, match="--batch-size"):
        main(["measure", "--batch-size", "1", "--steps", "2", "--no-progress"])
