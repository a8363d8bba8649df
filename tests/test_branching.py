"""noisescale.branching: B_crit selection on synthetic loss curves with a known answer, the schedules, a real tiny
language model trained by the loop, branches whose learning rate follows the rule, and a resumable branch CSV."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import noisescale.branching as branching
from noisescale.branching import (
    LanguageModelSettings,
    batch_size_warmup,
    branch_loss,
    critical_batch_sizes,
    load_checkpoints,
    run_branches,
    save_checkpoints,
    select_critical_batch_size,
    train_language_model,
    train_reference_run,
    validation_loss,
    warmup_cosine,
)
from noisescale.models import tiny_transformer
from noisescale.text import SHIPPED_CORPUS_PATH, encode, load_text_file

SETTINGS = LanguageModelSettings(block_size=8, batch_size=4, learning_rate=1e-2, validation_windows=32)
factory = partial(tiny_transformer, d_model=16, n_heads=2, n_layers=1, block_size=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "slice.txt"
    path.write_bytes(SHIPPED_CORPUS_PATH.read_bytes()[:20_000])
    return load_text_file(path)


@pytest.fixture(scope="module")
def checkpoints(corpus):
    torch.manual_seed(0)
    return train_reference_run(factory(), corpus, SETTINGS, examples=160, checkpoint_examples=[80], seed=0)


def test_warmup_cosine_closed_form():
    assert warmup_cosine(0.0, 0.1, 0.1) == 0.0
    assert warmup_cosine(0.05, 0.1, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(0.1, 0.1, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(0.55, 0.1, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert warmup_cosine(1.0, 0.1, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("true_b_crit, expected", [(100.0, 64), (64.5, 64), (3.0, 2), (1e6, 1024)])
def test_selection_on_a_loss_penalty_with_a_known_threshold(true_b_crit, expected):
    # L(B) = 2 (1 + tolerance)^((B - 1) / (B* - 1)): L(B) / L(1) <= 1 + tolerance exactly for B <= B*
    sizes = [2**k for k in range(11)]
    tolerance = 0.02
    losses = [2.0 * (1 + tolerance) ** ((b - 1) / (true_b_crit - 1)) for b in sizes]
    result = select_critical_batch_size(sizes, losses, tolerance)
    assert result.value == expected
    assert result.at_largest == (expected == 1024) and not result.at_smallest


def test_selection_stops_at_the_first_failure_and_flags_censoring():
    sizes = [8, 16, 32, 64]
    assert select_critical_batch_size(sizes, [1.0, 1.005, 1.2, 1.001], 0.01).value == 16  # noisy pass after a fail
    shuffled = select_critical_batch_size([32, 8, 64, 16], [1.2, 1.0, 1.001, 1.005], 0.01)
    assert shuffled.value == 16
    smallest = select_critical_batch_size(sizes, [1.0, 1.5, 1.6, 1.7], 0.01)
    assert (smallest.value, smallest.at_smallest, smallest.at_largest) == (8, True, False)
    largest = select_critical_batch_size(sizes, [1.0, 1.0, 1.0, 1.0], 0.0)
    assert (largest.value, largest.at_smallest, largest.at_largest) == (64, False, True)
    with pytest.raises(ValueError, match="finite"):
        select_critical_batch_size(sizes, [1.0, math.nan, 1.0, 1.0], 0.01)
    with pytest.raises(ValueError, match="same length"):
        select_critical_batch_size(sizes, [1.0], 0.01)


def test_critical_batch_sizes_per_checkpoint_with_the_seed_range():
    # seed s at checkpoint c: L(B) = 3 (1.01)^((B - 4) / (B*_cs - 4)), so that seed's B_crit is the largest
    # power of two <= B*_cs
    rows = []
    for mark, seed_thresholds in [(100, (6.0, 20.0)), (200, (50.0, 200.0))]:
        for seed, b_star in enumerate(seed_thresholds):
            for b in [4, 8, 16, 32, 64, 128]:
                rows.append({"checkpoint_examples": mark, "checkpoint_step": mark // 4, "tokens": mark * 8,
                             "batch_size": b, "seed": seed, "loss": 3.0 * 1.01 ** ((b - 4) / (b_star - 4))})
    table = critical_batch_sizes(pd.DataFrame(rows), tolerance=0.01)
    assert table["checkpoint_examples"].tolist() == [100, 200]
    assert table["b_crit_seeds"].tolist() == ["4 16", "32 128"]
    assert table["b_crit_low"].tolist() == [4, 32] and table["b_crit_high"].tolist() == [16, 128]
    assert table["loss_b8"].iloc[0] == pytest.approx(1.5 * (1.01 ** 2 + 1.01 ** 0.25))
    # the seed-mean curve / 3 at checkpoint 100, B = 8: (1.0201 + 1.0025) / 2 = 1.0113 > 1.01 -> B_crit 4;
    # at checkpoint 200, B = 64: (1.0131 + 1.0031) / 2 = 1.0081 passes, B = 128: 1.0168 fails -> 64
    assert table["b_crit"].tolist() == [4, 64]
    assert table["at_smallest"].tolist() == [True, False] and table["at_largest"].tolist() == [False, False]


def test_batch_size_warmup_follows_the_curve_in_powers_of_two():
    schedule = batch_size_warmup([1000, 100, 5000], [20.0, 3.0, 900.0], minimum=4, maximum=256)
    assert [schedule(e) for e in (0, 99, 100, 999, 1000, 4999, 5000, 10**6)] == [4, 4, 4, 4, 16, 16, 256, 256]


def test_training_loop_sees_exactly_the_examples_and_learns(corpus):
    torch.manual_seed(0)
    model = factory()
    before = validation_loss(model, corpus, SETTINGS)
    rows = []
    steps = train_language_model(model, SETTINGS.optimizer(model), corpus, SETTINGS, examples=203,
                                 batch_size=lambda seen: 4 if seen < 100 else 16,
                                 learning_rate=lambda seen, size: 1e-2, generator=torch.Generator().manual_seed(0),
                                 on_step=rows.append)
    assert rows[-1]["examples_seen"] == 203 and steps == len(rows) == 25 + 7  # 25 x 4, then 6 x 16 and 7
    assert [r["batch_size"] for r in rows[-2:]] == [16, 7]
    assert validation_loss(model, corpus, SETTINGS) < before - 1.0  # from ~log(256) = 5.5 nats


def test_reference_run_checkpoints(corpus, checkpoints):
    assert [c.examples_seen for c in checkpoints] == [80, 160]
    assert [c.step for c in checkpoints] == [20, 40]
    first, last = checkpoints
    assert first.learning_rate == pytest.approx(1e-2 * warmup_cosine(0.5, 0.05, 0.1))
    assert last.validation_loss < first.validation_loss < math.log(256)
    with pytest.raises(ValueError, match="multiples of the batch size"):
        train_reference_run(factory(), corpus, SETTINGS, examples=160, checkpoint_examples=[81])


def test_branch_learning_rate_rule_and_determinism(corpus, checkpoints, monkeypatch):
    checkpoint = checkpoints[0]
    state = {k: v.clone() for k, v in checkpoint.model_state.items()}
    moments = [v["exp_avg_sq"].clone() for v in checkpoint.optimizer_state["state"].values()]
    seen_rates = []
    original = branching.train_language_model

    def spy(*args, **kwargs):
        seen_rates.append(kwargs["learning_rate"](0, kwargs["batch_size"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(branching, "train_language_model", spy)
    loss, steps = branch_loss(factory, checkpoint, corpus, SETTINGS, batch_size=16, examples=64, seed=1)
    again, _ = branch_loss(factory, checkpoint, corpus, SETTINGS, batch_size=16, examples=64, seed=1)
    branch_loss(factory, checkpoint, corpus, SETTINGS, batch_size=16, examples=64, seed=1, rule="linear")
    assert steps == 4 and loss == again and math.isfinite(loss)
    assert seen_rates[0] == pytest.approx(checkpoint.learning_rate * 2.0)  # sqrt(16 / 4)
    assert seen_rates[2] == pytest.approx(checkpoint.learning_rate * 4.0)
    assert all(torch.equal(state[k], v) for k, v in checkpoint.model_state.items())  # the checkpoint is untouched
    assert all(torch.equal(m, v["exp_avg_sq"]) for m, v in zip(moments, checkpoint.optimizer_state["state"].values()))


def test_checkpoints_save_and_load_with_their_config(tmp_path, checkpoints):
    path = tmp_path / "reference.pt"
    save_checkpoints(path, checkpoints, {"examples": 160})
    loaded = load_checkpoints(path, {"examples": 160})
    assert [c.examples_seen for c in loaded] == [80, 160]
    assert all(torch.equal(loaded[1].model_state[k], v) for k, v in checkpoints[1].model_state.items())
    assert load_checkpoints(path, {"examples": 320}) is None
    assert load_checkpoints(tmp_path / "none.pt", {}) is None



class _RunsCode:
    """Unpickled, it creates a file: what a reference.pt crafted by someone else could do if loaded with pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_a_reference_file_that_would_run_code_is_not_loaded(tmp_path):
    """reference.pt sits in the output folder; it was loaded with weights_only=False, so a crafted one ran code (an
    audit's finding). Loaded with weights_only=True it is refused, and the run trains its checkpoints anew."""
    marker, path = tmp_path / "ran", tmp_path / "reference.pt"
    torch.save({"config": {"examples": 160}, "checkpoints": [], "payload": _RunsCode(marker)}, path)
    assert load_checkpoints(path, {"examples": 160}) is None
    assert not marker.exists()

def test_run_branches_resumes_without_retraining_and_retrains_a_damaged_row(tmp_path, corpus, checkpoints,
                                                                          monkeypatch):
    path = tmp_path / "branches.csv"
    options = dict(batch_sizes=[4, 8], branch_examples=32, seeds=[0, 1], progress=False)
    first = run_branches(path, factory, checkpoints[:1], corpus, SETTINGS, **options)
    assert len(first) == 4 and first["steps"].tolist() == [8, 8, 4, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branches.csv"]  # no temporary file left behind

    calls = []
    original = branching.branch_loss

    def counting(*args, **kwargs):
        calls.append((kwargs["batch_size"], kwargs["seed"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(branching, "branch_loss", counting)
    again = run_branches(path, factory, checkpoints[:1], corpus, SETTINGS, **options)
    assert calls == [] and again.equals(first)

    damaged = first.copy()
    damaged.loc[(damaged["batch_size"] == 8) & (damaged["seed"] == 1), "loss"] = np.nan
    damaged.to_csv(path, index=False)
    repaired = run_branches(path, factory, checkpoints[:1], corpus, SETTINGS, **options)
    assert calls == [(8, 1)]
    pd.testing.assert_frame_equal(repaired, first)  # the same seed gives the same loss

    with pytest.raises(ValueError, match="other settings"):
        run_branches(path, factory, checkpoints[:1], corpus, SETTINGS, **{**options, "branch_examples": 64})


def test_encode_of_the_corpus_slice_matches_the_file(corpus):
    assert torch.equal(torch.cat([corpus.train, corpus.validation]), encode(SHIPPED_CORPUS_PATH.read_bytes()[:20_000]))


def test_branch_command_end_to_end_and_resumes(tmp_path, capsys, monkeypatch):
    from noisescale.app.cli import build_parser
    from noisescale.app.options import UsageError

    parser = build_parser()
    text = tmp_path / "my_text.txt"
    text.write_bytes(SHIPPED_CORPUS_PATH.read_bytes()[:20_000])
    argv = ["branch", "--text", str(text), "--block-size", "8", "--batch-size", "4", "--steps", "20",
            "--checkpoints", "0.5", "--branch-batch-sizes", "4,8", "--branch-examples", "16", "--seeds", "2",
            "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "critical_batch_size.csv")
    assert table["checkpoint_step"].tolist() == [10] and table["seeds"].tolist() == [2]
    assert f"B_crit = {table['b_crit'].iloc[0]}" in printed and "unigram baseline" in printed
    assert len(pd.read_csv(tmp_path / "out" / "branches.csv")) == 4

    calls = []
    monkeypatch.setattr(branching, "train_language_model", lambda *a, **k: calls.append(1))
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    assert calls == [] and "reference run reloaded" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--checkpoints", "1.5"])

    # a rerun with other settings in the same --out trained its reference run over the first one's and only then
    # refused the branches (an audit's finding): now refused before anything is trained, the files as they were
    files = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    args = parser.parse_args([*argv, "--lr", "0.001"])
    with pytest.raises(UsageError, match="holds the reference run of other settings"):
        args.run(args)
    assert calls == [] and {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == files


def test_byte_gpt_starts_near_the_uniform_loss_unlike_the_default_init():
    from noisescale.models import byte_gpt, sequence_cross_entropy

    with torch.no_grad():
        torch.manual_seed(0)
        tokens = torch.randint(0, 256, (16, 33))
        gpt = byte_gpt(d_model=32, n_heads=2, n_layers=2, block_size=32)
        loss = float(sequence_cross_entropy(gpt(tokens[:, :-1]), tokens[:, 1:]).mean())
        assert abs(loss - math.log(256)) < 0.05  # near-uniform predictions at initialisation
        assert float(gpt.token.weight.std()) == pytest.approx(0.02, rel=0.05)
        assert float(gpt.blocks[0].mlp[2].weight.std()) == pytest.approx(0.01, rel=0.05)  # 0.02 / sqrt(2 * 2)
        default = tiny_transformer(d_model=32, n_heads=2, n_layers=2, block_size=32)
        assert float(sequence_cross_entropy(default(tokens[:, :-1]), tokens[:, 1:]).mean()) > math.log(256) + 2


@pytest.mark.parametrize(("batch_sizes", "examples", "message"), [
    ([4, 8, 16, 32, 64], 24, r"batch size\(s\) \[32, 64\] exceed branch_examples=24.*>= 64"),  # a user's run
    ([4, 8, 16], 24, r"not a multiple of batch size\(s\) \[16\].*multiple of 16 .*e.g. 16 or 32"),
    ([4, 8, 24], 64, r"not a multiple of batch size\(s\) \[24\].*multiple of 24 .*e.g. 48 or 72"),
    ([8], 64, "at least 2 are needed"),
    ([8, 8, 16], 64, "strictly increasing without repeats"),
    ([16, 8], 64, "strictly increasing without repeats"),
])
def test_run_branches_refuses_a_plan_with_untrained_batch_sizes_before_training(
        batch_sizes, examples, message, tmp_path, corpus, checkpoints, monkeypatch):
    """A new user's --branch-examples 24 with batch sizes 32 and 64: each took one step of 24 sequences and
    B_crit = 64 was reported; B = 16 took 16 + 8 (a partial step); one batch size gave "B_crit = 8 (lower bound)"
    with nothing compared. Now refused before any branch is trained."""
    monkeypatch.setattr(branching, "branch_loss", lambda *a, **k: pytest.fail("a branch was trained"))
    with pytest.raises(ValueError, match=message):
        run_branches(tmp_path / "b.csv", factory, checkpoints[:1], corpus, SETTINGS, batch_sizes=batch_sizes,
                     branch_examples=examples, seeds=[0], progress=False)
    assert not (tmp_path / "b.csv").exists()
    with pytest.raises(ValueError, match="not a multiple of batch_size=16"):
        branch_loss(factory, checkpoints[0], corpus, SETTINGS, batch_size=16, examples=24)


def test_selection_refuses_a_single_batch_size():
    with pytest.raises(ValueError, match="one batch size compares nothing"):
        select_critical_batch_size([8], [1.0], 0.01)
