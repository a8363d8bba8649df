"""`noisescale measure` and `train` on a user's own model, data and loss, a checkpoint, and the JSON summary,
checked against independent references (a naive per-example loop, a plain evaluation loop)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import _cli_user_code as user
import noisescale.app.measure as measure_job
from noisescale._digits import estimate_digits, rounded
from noisescale.app.cli import main
from noisescale.app.jobs import json_ready, noise_scale_fields, write_summary_json
from noisescale.app.plot import plot_training_curves
from noisescale.monitor import NoiseScaleSummary

TESTS = Path(__file__).resolve().parent
TEXT = ["--model", "_cli_user_code:make_text_model"]


def _run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    return subprocess.run([sys.executable, "-m", "noisescale", *arguments], capture_output=True, text=True,
                          timeout=600, env=environment, cwd=cwd)


def test_measure_a_text_model_from_the_command_line(tmp_path):
    """The user's module is found from the current folder, as `python -m` finds it; a single dataset is split 9:1."""
    out = tmp_path / "run"
    done = _run_cli("measure", *TEXT, "--dataset", "_cli_user_code:make_text_data", "--steps", "5",
                    "--batch-size", "16", "--hessian-every", "0", "--no-progress", "--out", str(out), cwd=TESTS)
    assert done.returncode == 0, done.stderr
    printed = done.stdout
    assert "data: _cli_user_code:make_text_data, 216 training / 24 test examples, 10% held out" in printed
    assert "after 5 steps (80 examples):" in printed and "B_simple =" in printed
    assert "B_noise: not measured (--hessian-every 0)" in printed   # the command's option, as train prints it
    assert "test accuracy after training:" in printed
    history = pd.read_csv(out / "measure_history.csv")
    assert len(history) == 5 and history["examples_seen"].iloc[-1] == 80 and history["b_simple"].notna().all()
    summary = json.loads((out / "measure_summary.json").read_text())
    assert summary["b_simple"] == pytest.approx(history["b_simple"].iloc[-1], rel=1e-12)
    low, high = map(float, summary["b_simple_interval"])   # "inf" in JSON
    place = estimate_digits(summary["b_simple"], low, high)   # the digits the interval supports (test_digits.py)
    assert f"B_simple = {rounded(summary['b_simple'], place)}  (90% interval {rounded(low, place)} .. " in printed
    assert summary["optimizer_steps"] == 5 and summary["b_noise"] is None  # not measured: null
    assert summary["b_noise_measurements"] == 0 and summary["suggested_from"] == "b_simple"
    assert (out / "measure.png").stat().st_size > 10_000


def test_measure_without_accuracy_reports_the_mean_test_loss(tmp_path, capsys):
    code = main(["measure", "--model", "_cli_user_code:make_regression_model", "--dataset",
                 "_cli_user_code:make_regression_data", "--loss", "_cli_user_code:per_example_squared_error",
                 "--steps", "5", "--batch-size", "16", "--hessian-every", "0", "--no-progress", "--json",
                 "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)  # --json: stdout is the JSON alone
    assert summary["test_accuracy"] is None and summary["test_examples"] == 12
    assert 0 < summary["test_loss"] < math.inf


@pytest.mark.parametrize("factory, refused", [
    ("make_regression_data_with_nan_inputs", "example 7 of the dataset is the first to hold NaN or Inf (its inputs, "
     "at [1]); its examples 0 to 119 hold NaN in its inputs (3 values)"),
    ("make_regression_data_with_an_inf_target", "example 30 of the dataset is the first to hold NaN or Inf (its "
     "targets); its examples 0 to 119 hold Inf in its targets (1 value)"),
    ("make_regression_splits_with_a_nan_test_target", "example 4 of the test set is the first to hold NaN or Inf "
     "(its targets); its examples 0 to 19 hold NaN in its targets (1 value)"),
])
@pytest.mark.parametrize("command", [["measure", "--steps", "3"], ["train", "--schedule", "fixed", "--epochs", "1"]])
def test_a_dataset_holding_nan_or_inf_is_refused_before_training(tmp_path, capsys, command, factory, refused):
    """Before, measure and train trained on it: steps with a non-finite loss were skipped or reported as a diverged
    run, and the test loss printed as nan. Now: exit 2 with the example, the tensor and what to do, no file written
    (not the checkpoint either)."""
    out, checkpoint = tmp_path / "out", tmp_path / "weights.pt"
    extra = ["--checkpoint", str(checkpoint)] if command[0] == "train" else []
    code = main([*command, "--model", "_cli_user_code:make_regression_model", "--dataset", f"_cli_user_code:{factory}",
                 "--loss", "_cli_user_code:per_example_squared_error", "--batch-size", "8", "--out", str(out),
                 "--no-progress", *extra])
    assert code == 2
    assert capsys.readouterr().err == (
        f"noisescale: error: --dataset '_cli_user_code:{factory}': {refused}. Training on them gives non-finite "
        "losses: remove or fix those values (drop the examples, or torch.nan_to_num) and run again\n")
    # nothing written but the empty lock file the run held the folder by (--out in use by another run)
    assert [path.name for path in out.iterdir()] == [".noisescale.lock"] and not checkpoint.exists()


@pytest.mark.parametrize("command", [["measure", "--steps", "30"], ["train", "--schedule", "fixed", "--epochs", "2"],
                                     ["train", "--schedule", "noise-adaptive", "--epochs", "2", "--max-batch-size",
                                      "32"]])
def test_a_diverged_run_reports_no_noise_scale_in_its_text_or_json(tmp_path, capsys, command):
    """--lr 1e3 makes the squared error explode. train printed "B_simple = ... (90% interval ...)" for a run its own
    monitor called diverged, and both commands' JSON held b_simple and its interval without a word (a survey's
    find). Now both say the run diverged, and the JSON's estimates are null with no_noise_scale saying why."""
    def run(out: Path, *extra: str) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main([*command, "--model", "_cli_user_code:make_regression_model", "--dataset",
                         "_cli_user_code:make_regression_data", "--loss", "_cli_user_code:per_example_squared_error",
                         "--batch-size", "8", "--lr", "1e3", "--hessian-every", "0", "--out", str(out),
                         "--no-progress", *extra]) == 0
        return capsys.readouterr().out

    summary = json.loads(run(tmp_path / "json", "--json"))
    assert summary["no_noise_scale"].startswith("the run diverged (")
    assert summary["b_simple"] is None and summary["b_simple_interval"] == [None, None]
    assert summary["trace_sigma"] is None and summary["suggested_batch_size"] is None
    name = "measure_summary.json" if command[0] == "measure" else f"train_{command[2]}_summary.json"
    assert json.loads((tmp_path / "json" / name).read_text())["no_noise_scale"] == summary["no_noise_scale"]
    text = run(tmp_path / "text")
    assert "the run diverged (" in text and "B_simple =" not in text and "interval" not in text
    # the batch sizes a policy chose stay printed: what one reads first in such a run (a review's find)
    assert ("batch sizes chosen (from step): 8 (0)" in text) == ("noise-adaptive" in command)


def test_a_run_broken_by_bad_data_says_so_in_its_json():
    """no_noise_scale named the batch alone; it now says that the data broke the run, as a diverged run's says
    that it diverged (a review's find)."""
    summary = NoiseScaleSummary(steps=5, examples_seen=40, b_simple=3.0, b_simple_interval=(1.0, 9.0),
                                confidence=0.9, trace_sigma=3.0, grad_sqnorm=1.0, b_noise=math.nan, nonfinite_steps=2,
                                bad_data="step 3: the batch holds NaN in its inputs (1 value)",
                                broken_by_bad_data=True)
    fields = noise_scale_fields(summary)
    assert fields["no_noise_scale"] == ("bad data broke the run (step 3: the batch holds NaN in its inputs (1 "
                                        "value): every step since was non-finite)")
    assert fields["b_simple"] is None and fields["bad_data"] == summary.bad_data


def test_a_dataset_read_example_by_example_is_not_read_ahead_and_its_bad_batch_is_named(tmp_path, capsys):
    """Only a dataset in memory is checked before training (another may read each example from disk): here the
    step that meets the NaN example is skipped, with a warning that names the data, not the learning rate."""
    with pytest.warns(RuntimeWarning, match=r"the batch holds NaN in its inputs \(3 values\);.*"
                      "the learning rate is not the cause"):
        code = main(["train", "--schedule", "fixed", "--epochs", "1", "--model", "_cli_user_code:make_regression_model",
                     "--dataset", "_cli_user_code:make_lazy_regression_data_with_nan_inputs", "--loss",
                     "_cli_user_code:per_example_squared_error", "--batch-size", "8", "--out", str(tmp_path),
                     "--no-progress"])
    assert code == 0
    assert "fixed: test loss" in capsys.readouterr().out


def test_a_pair_of_data_loaders_gives_the_training_and_test_sets(tmp_path, capsys):
    code = main(["measure", *TEXT, "--dataset", "_cli_user_code:make_text_loaders", "--steps", "2", "--batch-size",
                 "8", "--hessian-every", "0", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    assert "data: _cli_user_code:make_text_loaders, 160 training / 40 test examples\n" in capsys.readouterr().out


def _naive_batch_estimates(model, loss_fn, inputs, targets):
    """|G|^2 and tr(Sigma) of one batch from per-example gradients computed one example at a time (float64)."""
    model = model.double()
    gradients = []
    for index in range(len(targets)):
        model.zero_grad()
        loss_fn(model(inputs[index: index + 1]), targets[index: index + 1]).sum().backward()
        gradients.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    per_example = torch.stack(gradients)
    size = len(targets)
    mean_sqnorm = per_example.square().sum(1).mean().item()
    grad_sqnorm = per_example.mean(0).square().sum().item()
    trace_sigma = size / (size - 1) * (mean_sqnorm - grad_sqnorm)
    return grad_sqnorm - trace_sigma / size, trace_sigma


def _saved_text_model(path: Path) -> dict:
    torch.manual_seed(7)
    model = user.make_text_model()
    for _ in range(20):  # a few steps so that the checkpoint is not the initialisation
        train, _ = user.make_text_splits()
        torch.optim.SGD(model.parameters(), lr=0.5).zero_grad()
        tokens, labels = train.tensors
        torch.nn.functional.cross_entropy(model(tokens), labels).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
                p.grad = None
    torch.save(model.state_dict(), path)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_measure_a_checkpoint_takes_no_step_and_measures_its_batches(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "model.pt"
    saved = _saved_text_model(weights)
    file_bytes = weights.read_bytes()
    seen = {}
    real_evaluate = measure_job.evaluate

    def evaluate_and_keep_weights(model, *args, **kwargs):  # the weights after measuring, before evaluation
        seen.update({name: tensor.clone() for name, tensor in model.state_dict().items()})
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(measure_job, "evaluate", evaluate_and_keep_weights)
    code = main(["measure", *TEXT, "--dataset", "_cli_user_code:make_text_splits", "--checkpoint", str(weights),
                 "--steps", "3", "--batch-size", "16", "--hessian-every", "0", "--seed", "5", "--no-progress",
                 "--json", "--out", str(tmp_path / "run")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["optimizer_steps"] == 0 and summary["steps"] == 3 and summary["checkpoint"] == str(weights)
    assert seen.keys() == saved.keys() and all(torch.equal(seen[name], saved[name]) for name in saved)
    assert weights.read_bytes() == file_bytes

    # the measured batches: seeded shuffles of the training set (--seed 5), from a naive per-example loop, in the
    # finite-population form of batches drawn without replacement from its N examples (a review: this path had
    # none, reading |G|^2 low by tr(Sigma)/(N - 1))
    model = user.make_text_model()
    model.load_state_dict(saved)
    train, test = user.make_text_splits()
    population = len(train)
    order = torch.randperm(population, generator=torch.Generator().manual_seed(5))
    history = pd.read_csv(tmp_path / "run" / "measure_history.csv")
    for step in range(3):
        tokens, labels = train[order[16 * step: 16 * step + 16]]
        grad_sqnorm, noise = _naive_batch_estimates(model, measure_job_loss(), tokens, labels)
        assert history["grad_sqnorm"][step] == pytest.approx(grad_sqnorm + noise / population, rel=1e-4, abs=1e-7)
        assert history["trace_sigma"][step] == pytest.approx(noise * (population - 1) / population, rel=1e-4)
    with torch.no_grad():
        tokens, labels = test.tensors
        accuracy = (model.float()(tokens).argmax(1) == labels).double().mean().item()
    assert summary["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert json.loads((tmp_path / "run" / "measure_summary.json").read_text()) == summary


def measure_job_loss():
    from noisescale.losses import per_example_cross_entropy

    return per_example_cross_entropy


def test_measure_reads_a_train_checkpoint(tmp_path, capsys):
    """A `noisescale train --checkpoint` file is measured with the trained weights: same test accuracy."""
    checkpoint = tmp_path / "train.pt"
    assert main(["train", "--schedule", "fixed", *TEXT, "--dataset", "_cli_user_code:make_text_splits",
                 "--epochs", "1", "--batch-size", "32", "--checkpoint", str(checkpoint), "--no-progress", "--json",
                 "--out", str(tmp_path / "train")]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert main(["measure", *TEXT, "--dataset", "_cli_user_code:make_text_splits", "--checkpoint", str(checkpoint),
                 "--steps", "2", "--batch-size", "16", "--hessian-every", "0", "--no-progress", "--json",
                 "--out", str(tmp_path / "measure")]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["test_accuracy"] == trained["test_accuracy"] and measured["optimizer_steps"] == 0


def test_json_values_are_strict_json_and_the_summary_is_replaced_atomically(tmp_path):
    assert json_ready({"a": math.inf, "b": math.nan, "c": (1.0, -math.inf), "d": Path("x"), "e": None}) == \
        {"a": "inf", "b": None, "c": [1.0, "-inf"], "d": "x", "e": None}
    path = write_summary_json({"b_simple": 12.5, "b_noise": math.inf}, tmp_path / "summary.json")
    assert json.loads(path.read_text()) == {"b_simple": 12.5, "b_noise": "inf"}
    before = path.read_bytes()
    with pytest.raises(TypeError):  # a failure while writing (here: an unserialisable value)
        write_summary_json({"b_simple": object()}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_train_prints_and_plots_the_noise_scale_it_acted_on(tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["train", "--schedule", "noise-adaptive", *TEXT, "--dataset", "_cli_user_code:make_text_data",
                 "--epochs", "3", "--batch-size", "8", "--max-batch-size", "64", "--lr", "0.2", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    history = pd.read_csv(out / "train_noise-adaptive_history.csv")
    last = history.iloc[-1]
    place = estimate_digits(last["b_simple"], last["b_simple_low"], last["b_simple_high"])
    assert (f"B_simple = {rounded(last['b_simple'], place)} (90% interval {rounded(last['b_simple_low'], place)} .. "
            f"{rounded(last['b_simple_high'], place)})") in printed
    changes = history[history["batch_size"].diff().fillna(1) != 0]
    assert len(changes) >= 2  # the policy changed B at least once
    chosen = " -> ".join(f"{b} ({s})" for s, b in zip(changes["step"], changes["batch_size"]))
    assert f"batch sizes chosen (from step): {chosen}" in printed
    summary = json.loads((out / "train_noise-adaptive_summary.json").read_text())
    assert [row["batch_size"] for row in summary["batch_sizes"]] == changes["batch_size"].tolist()
    assert summary["b_simple"] == pytest.approx(last["b_simple"], rel=1e-12)

    evaluations = pd.read_csv(out / "train_noise-adaptive_evaluations.csv")
    figure = plot_training_curves(history, evaluations)
    batch_axes = next(ax for ax in figure.axes if ax.get_title() == "Batch size and measured noise scale")
    dashed = [line for line in batch_axes.get_lines() if line.get_linestyle() == "--" and len(line.get_ydata())]
    assert len(dashed) == 1
    b_simple = history["b_simple"].to_numpy()
    assert dashed[0].get_ydata() == pytest.approx(b_simple[np.isfinite(b_simple)], rel=1e-12)
    assert "B_{simple}" in " ".join(text.get_text() for text in batch_axes.get_legend().get_texts())
    # evaluations within one decade of steps (44 to 74 in a new user's run) left that axis without a tick label
    figure = plot_training_curves(history, evaluations.assign(step=np.linspace(44, 74, len(evaluations))))
    step_axes = next(ax for ax in figure.axes if ax.get_title().endswith("against steps"))
    figure.canvas.draw()
    low, high = step_axes.get_xlim()
    shown = [tick for tick in step_axes.xaxis.get_major_ticks() + step_axes.xaxis.get_minor_ticks()
             if tick.label1.get_text() and low <= tick.get_loc() <= high]
    assert shown
