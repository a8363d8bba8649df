"""The user-facing surface: the README's API example runs as written, and `noisescale measure` works end to end."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
import torch

import noisescale.data
from _ranks import torchrun_noisescale
from noisescale.app.cli import main
from noisescale.models import load_model_factory

README = Path(__file__).resolve().parent.parent / "README.md"
DOCS = README.parent / "docs"


@pytest.fixture
def shipped_subset_only(monkeypatch, tmp_path):
    """Make the data loader ignore a Debian copy of Fashion-MNIST, as on a fresh machine."""
    monkeypatch.setattr(noisescale.data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-copy")


def test_readme_api_example_runs_and_measures():
    block = re.search(r"## Use it in your own training loop\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 3, generator=generator)  # learnable labels: the gradient stays above the noise
    inputs = torch.randn(120 * 128, 5, generator=generator)
    dataset = torch.utils.data.TensorDataset(inputs, (inputs @ teacher).argmax(1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True, generator=generator)
    namespace = {"model": model, "loader": loader, "optimizer": torch.optim.SGD(model.parameters(), lr=0.05)}
    exec(compile(block, str(README), "exec"), namespace)
    monitor = namespace["monitor"]
    assert len(monitor.history) == 120 and monitor.population_size == 120 * 128
    summary = monitor.summary()
    assert 0 < summary.b_simple < math.inf and 0 < summary.b_noise < math.inf
    assert monitor.history["trace_h"].notna().sum() == 2  # hessian_every=100: steps 0 and 100


def test_readme_adaptive_trainer_snippet_runs_and_steps_at_the_schedulers_rate_times_the_coupling():
    """The README's AdaptiveTrainer with a warmup LambdaLR: every step's rate (read by a step pre-hook) is the
    warmup's times sqrt(B / 16), and B grows."""
    block = re.search(r"\*\*A learning-rate scheduler with `AdaptiveTrainer`\.\*\*.*?```python\n(.*?)```",
                      README.read_text(), re.S).group(1)
    used = []
    real_init = torch.optim.SGD.__init__

    def recording_init(self, *args, **kwargs):   # the snippet builds its own optimizer: hook it as it is made
        real_init(self, *args, **kwargs)
        self.register_step_pre_hook(lambda opt, a, k: used.append(float(opt.param_groups[0]["lr"])))

    torch.manual_seed(0)
    namespace = {}
    with mock.patch.object(torch.optim.SGD, "__init__", recording_init):
        exec(compile(block, str(README), "exec"), namespace)
    history = namespace["trainer"].history
    assert history["batch_size"].iloc[-1] > 16 and len(used) == 50
    expected = [0.05 * min(1.0, (step + 1) / 20) * math.sqrt(size / 16)
                for step, size in enumerate(history["batch_size"])]
    assert used == pytest.approx(expected, rel=1e-12) and history["learning_rate"].tolist() == used


def test_readme_seeds_snippet_prints_what_it_says(tmp_path, monkeypatch, capsys):
    """The README's combination of three seeds' JSON summaries, on the tr(Sigma) and |G|^2 those three runs wrote
    (session 26's quick start with --seed 1, 2, 3): it prints the line its comment shows."""
    block = re.search(r"From the commands' JSON summaries:\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    written = {1: (147.00283995814462, 0.9405234662101285), 2: (174.25521486274548, 1.3807355477880483),
               3: (144.91613928483898, 1.3984485737025025)}
    for seed, (trace_sigma, grad_sqnorm) in written.items():
        (tmp_path / "runs" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "runs" / f"seed{seed}" / "measure_summary.json").write_text(
            json.dumps({"trace_sigma": trace_sigma, "grad_sqnorm": grad_sqnorm}))
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {})
    assert "# " + capsys.readouterr().out.strip() in block


def test_readme_per_example_snippet_runs_and_is_exact():
    """The README's snippet of the per-example norms alone, on a small MLP in float64: the norms by the call and by
    observe equal a loop over single examples."""
    block = re.search(r"\*\*The per-example norms alone\*\*.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(6, 5, generator=generator, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])

    def per_example_loss(outputs, labels):
        return torch.nn.functional.cross_entropy(outputs, labels, reduction="none")

    expected = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(
        per_example_loss(model(inputs[i:i + 1]), targets[i:i + 1]).sum(), list(model.parameters())))
        for i in range(6)])
    namespace = {"model": model, "inputs": inputs, "targets": targets, "batch_size": 6,
                 "per_example_loss": per_example_loss}
    exec(compile(block, str(README), "exec"), namespace)
    torch.testing.assert_close(namespace["result"].sqnorms, expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(namespace["observed"].sqnorms, expected, rtol=1e-9, atol=0)
    assert set(namespace["result"].backend_of.values()) == {"ghost"}


def test_readme_micro_batch_snippet_for_a_coupled_loss():
    """docs/models.md's two-batch estimate of a contrastive loss from micro-batches: its big batch's gradient is the mean
    of the micro-batches' (against their gradients stacked by hand), and the estimate solves the two equations
    E|g_b|^2 = |G|^2 + tr(Sigma)/b at b = 8 and 32."""
    models = DOCS / "models.md"
    block = re.search(r"\*\*A coupled loss, measured from micro-batches\.\*\*.*?```python\n(.*?)```", models.read_text(),
                      re.S).group(1)
    torch.manual_seed(0)
    towers = torch.nn.ModuleList([torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)]).double()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.towers = towers

        def forward(self, x, t):
            return self.towers[0](x), self.towers[1](t)

    def contrastive_loss(outputs):
        image, text = (torch.nn.functional.normalize(e, dim=-1) for e in outputs)
        return torch.nn.functional.cross_entropy(5 * image @ text.T, torch.arange(len(image)))

    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(32, 6, generator=generator, dtype=torch.float64),
             torch.randn(32, 5, generator=generator, dtype=torch.float64))
    namespace = {"model": Model(), "batch": batch, "contrastive_loss": contrastive_loss, "print": lambda *a: None}
    exec(compile(block, str(models), "exec"), namespace)
    grads = []
    for i in range(0, 32, 8):
        loss = contrastive_loss(namespace["model"](batch[0][i:i + 8], batch[1][i:i + 8]))
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(towers.parameters()))]))
    grads = torch.stack(grads)
    torch.testing.assert_close(namespace["small"], grads.square().sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(namespace["big"], grads.mean(0).square().sum(), rtol=1e-12, atol=0)
    estimate, small, big = namespace["estimate"], float(grads.square().sum(1).mean()), float(grads.mean(0).square().sum())
    assert small == pytest.approx(estimate.grad_sqnorm + estimate.trace_sigma / 8, rel=1e-12)
    assert big == pytest.approx(estimate.grad_sqnorm + estimate.trace_sigma / 32, rel=1e-12)


def test_measure_command_end_to_end(tmp_path, capsys, shipped_subset_only):
    out = tmp_path / "run"
    code = main(["measure", "--steps", "12", "--batch-size", "32", "--hessian-every", "5", "--out", str(out),
                 "--no-progress", "--model", "noisescale.models:mlp"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "12000 training" in printed and "B_simple =" in printed
    assert re.search(r"B_noise( = [0-9.]+|: not resolved yet)", printed)  # a value, or why there is none
    history = pd.read_csv(out / "measure_history.csv")
    assert len(history) == 12 and history["examples_seen"].iloc[-1] == 12 * 32
    assert history["b_noise"].notna().sum() == 3
    assert (out / "measure.png").stat().st_size > 10_000
    for name, path in [("history", "measure_history.csv"), ("figure", "measure.png"), ("summary", "measure_summary.json")]:
        assert f"{name}: {out / path}\n" in printed and (out / path).exists()   # every file written is named


@pytest.mark.parametrize(
    ("spec", "message"),
    [("no_colon", "package.module:factory"), ("noisescale.models:nothing", "cannot load"),
     ("noisescale.models:__doc__", "not a callable")],
)
def test_model_spec_errors_name_the_problem(spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_model_factory(spec)


def test_measure_rejects_a_batch_of_one(shipped_subset_only, tmp_path, capsys):
    assert main(["measure", "--batch-size", "1", "--steps", "2", "--no-progress", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "noisescale: error: --batch-size '1': must be >= 2 to estimate a " \
        "gradient variance"


def test_measure_and_train_run_data_parallel_under_torchrun(tmp_path, hang_deadline_s, capsys):
    """Two gloo ranks: `measure` records the single-process history (same global batches), printed once;
    `train --schedule noise-adaptive` resumes a one-process run on two ranks and back, and writes its files once.
    The one-process run ends at B = 33, which two ranks cannot split: the policy continues at 34, the nearest
    multiple of 2 (before, a run resumed on another number of processes was refused as "not of this run")."""
    options = ["--steps", "4", "--batch-size", "16", "--hessian-every", "0", "--model", "noisescale.models:mlp"]
    printed = torchrun_noisescale("measure", *options, "--out", str(tmp_path / "ddp"), deadline_s=hang_deadline_s)
    assert printed.count("B_simple =") == 1
    assert main(["measure", *options, "--out", str(tmp_path / "single"), "--no-progress"]) == 0
    ddp, single = (pd.read_csv(tmp_path / run / "measure_history.csv") for run in ("ddp", "single"))
    assert ddp["batch_size"].tolist() == single["batch_size"].tolist() == [16] * 4
    for column in ("loss", "grad_sqnorm", "trace_sigma", "b_simple"):
        pd.testing.assert_series_equal(ddp[column], single[column], rtol=1e-4, check_exact=False)

    train = ["train", "--schedule", "noise-adaptive", "--train-examples", "512", "--batch-size", "16",
             "--max-batch-size", "64", "--model", "noisescale.models:mlp"]
    assert main([*train, "--epochs", "2", "--checkpoint", str(tmp_path / "one.pt"), "--out", str(tmp_path / "one"),
                 "--no-progress"]) == 0
    one = pd.read_csv(tmp_path / "one" / "train_noise-adaptive_history.csv")
    assert one["batch_size"].iloc[-1] == 33
    printed, said = torchrun_noisescale(*train, "--epochs", "2.5", "--resume", str(tmp_path / "one.pt"),
                                        "--checkpoint", str(tmp_path / "two.pt"), "--out", str(tmp_path / "two"),
                                        deadline_s=hang_deadline_s, stderr=True)
    assert printed.count("noise-adaptive: test accuracy") == 1
    assert [line for line in said.splitlines() if "granularity" in line] == [   # once, by rank 0
        "noisescale: warning: the policy's state was saved at granularity 1 and continues at granularity 2 (another "
        "number of processes): its batch size 33 becomes 34, the nearest multiple"]
    two = pd.read_csv(tmp_path / "two" / "train_noise-adaptive_history.csv")
    resumed = two.iloc[len(one):]
    assert two.iloc[:len(one)]["batch_size"].tolist() == one["batch_size"].tolist()
    assert resumed["batch_size"].iloc[0] == 34 and (resumed["batch_size"] % 2 == 0).all()
    assert resumed["examples_seen"].iloc[-1] >= 1280
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")   # (whatever -W the suite runs with: the command follows the filters)
        assert main([*train, "--epochs", "3", "--lr", "0.1", "--resume", str(tmp_path / "two.pt"), "--out",
                     str(tmp_path / "three"), "--no-progress"]) == 0
    said = capsys.readouterr().err.splitlines()   # in the command's words, not Python's warning format
    assert [line for line in said if "optimizer settings" in line] == [
        "noisescale: warning: resuming with the checkpoint's optimizer settings, not this trainer's: group 0: lr 0.05 "
        "(this trainer: 0.1). An exact resume continues the checkpointed run; to change them, start a new run (in "
        "your own code you may also set optimizer.param_groups after load_state_dict)"]
    three = pd.read_csv(tmp_path / "three" / "train_noise-adaptive_history.csv")
    assert three.iloc[:len(two)]["batch_size"].tolist() == two["batch_size"].tolist()
    assert three["examples_seen"].iloc[-1] >= 1536


DOCUMENTS = [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_code_fences_stand_on_their_own_lines_and_pair_up(document):
    """A fence followed by text on its line (session 26: "``` Two more biases...") opens no block in CommonMark's
    eyes but closes none either: the next 60 lines, the heading of "Use it in your own training loop" among them,
    rendered as code (a new user's find)."""
    lines = document.read_text().splitlines()
    fences = [(number, line) for number, line in enumerate(lines, 1) if "```" in line]
    assert [(number, line) for number, line in fences if not re.fullmatch(r"```[a-z]*", line.strip())] == []
    assert len(fences) % 2 == 0
    assert all(not line.strip().removeprefix("```") for _, line in fences[1::2])   # a closing fence names nothing


def _github_anchor(heading):
    """The id GitHub gives a heading: lower case, punctuation but hyphens and underscores dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_relative_links_reach_a_file_and_a_heading(document):
    """Every relative link of the README and docs/ names a file that exists, and every #anchor a heading of its file
    (the README's notes moved to docs/ in session 27; a link left pointing at a moved section is caught here)."""
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or document != README
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (document.parent / path).resolve() if path else document
        assert target.exists(), f"{document.name}: {link} names no file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), flags=re.M)
            assert anchor in {_github_anchor(h) for h in headings}, f"{document.name}: {link} names no heading"
