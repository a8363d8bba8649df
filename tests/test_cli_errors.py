"""Errors a person can act on: one line naming the option and its value, exit status 2, a traceback only with
--debug, the output folder checked before any training; --help shows every default; the commands share options."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import noisescale
import noisescale.app.measure as measure_job
import noisescale.app.train as train_job
from noisescale.app.cli import build_parser, main
from noisescale.app.options import DEFAULT_THREADS, set_threads

FAST = ["--steps", "2", "--batch-size", "4", "--hessian-every", "0", "--no-progress"]


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("noisescale: error: ")
    return lines[0]


@pytest.mark.parametrize(("arguments", "expected"), [
    (["--model", "_cli_user_code:not_a_module"],
     "--model '_cli_user_code:not_a_module': the factory returned a str, not a torch.nn.Module"),
    (["--model", "no_colon"], "--model 'no_colon': expected 'package.module:name'"),
    (["--model", "noisescale.models:nothing"], "--model 'noisescale.models:nothing': module 'noisescale.models' has "
                                               "no attribute 'nothing'"),
    (["--device", "mps"], "--device 'mps': mps is not available on this machine"),
    (["--device", "banana"], "--device 'banana': not a torch device name"),
    (["--dataset", "_cli_user_code:make_unlabelled"], "--dataset '_cli_user_code:make_unlabelled': item 0 of the "
                                                      "dataset is a 1-item tuple; expected an (inputs, targets) pair"),
    (["--model", "_cli_user_code:make_text_model", "--dataset", "_cli_user_code:make_text_data", "--loss",
      "_cli_user_code:mean_loss"], "--loss '_cli_user_code:mean_loss': returned () for 2 examples"),
    (["--dataset", "_cli_user_code:make_loader_with_own_collate"], "--dataset "
     "'_cli_user_code:make_loader_with_own_collate': the dataset DataLoader has its own collate_fn"),
    (["--checkpoint", "no-such-file.pt"], "--checkpoint 'no-such-file.pt': no such file"),
    (["--data", "no-such-folder"], "--data 'no-such-folder':"),
    (["--threads", "0"], "--threads '0': must be >= 1"),
    (["--batch-size", "1"], "--batch-size '1': must be >= 2"),
])
def test_measure_errors_are_one_line_naming_the_option(arguments, expected, tmp_path, capsys):
    code = main(["measure", *FAST, "--out", str(tmp_path / "out"), *arguments])
    assert code == 2
    assert expected in _error_line(capsys)


def test_a_dataset_that_does_not_fit_the_model_names_the_options_to_check(tmp_path, capsys):
    code = main(["measure", *FAST, "--dataset", "_cli_user_code:make_vectors", "--out", str(tmp_path)])
    assert code == 2
    line = _error_line(capsys)
    assert "the model cannot run on the data (inputs (2, 7) float32)" in line
    assert "--model 'noisescale.models:lenet5'" in line and "--dataset '_cli_user_code:make_vectors'" in line


def test_a_bad_checkpoint_file_names_the_option(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["measure", *FAST, "--checkpoint", str(garbage), "--out", str(tmp_path / "out")]) == 2
    assert f"--checkpoint {garbage}: cannot be loaded as a checkpoint" in _error_line(capsys)
    other_model = tmp_path / "mlp.pt"
    torch.save(noisescale.models.mlp().state_dict(), other_model)
    assert main(["measure", *FAST, "--checkpoint", str(other_model), "--out", str(tmp_path / "out")]) == 2
    assert f"--checkpoint '{other_model}': does not fit the --model" in _error_line(capsys)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="not a torch.nn.Module"):
        main(["measure", *FAST, "--model", "_cli_user_code:not_a_module", "--out", str(tmp_path), "--debug"])


def _out_cases(tmp_path: Path) -> list[tuple[Path, str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [(a_file, "exists and is not a folder"), (a_file / "below", "a part of the path is a file")]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked, "cannot write there"))
    return cases


@pytest.mark.parametrize("command", ["measure", "train"])
def test_an_unusable_out_fails_before_any_data_model_or_training(command, tmp_path, capsys, monkeypatch):
    def not_reached(*args, **kwargs):
        raise AssertionError("the job started before --out was checked")

    monkeypatch.setattr(measure_job, "build_training_job", not_reached)
    monkeypatch.setattr(train_job, "build_training_job", not_reached)
    arguments = FAST if command == "measure" else ["--schedule", "fixed", "--epochs", "0.1", "--no-progress"]
    for out, reason in _out_cases(tmp_path):
        assert main([command, *arguments, "--out", str(out)]) == 2
        assert f"--out '{out}': {reason}" in _error_line(capsys)


@pytest.mark.parametrize("command", ["measure", "train", "branch"])
def test_an_out_folder_in_use_by_another_run_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    """Two runs into one folder overwrote each other's files (an audit's finding). While one holds the folder, a
    second is refused in one line naming the lock, with the folder's files untouched; once the first has ended the
    folder is free again."""
    import noisescale.branching as branching
    from noisescale.app.options import locked_output_folder

    def not_reached(*args, **kwargs):
        raise AssertionError("the job started in a folder another run holds")

    monkeypatch.setattr(measure_job, "build_training_job", not_reached)
    monkeypatch.setattr(train_job, "build_training_job", not_reached)
    monkeypatch.setattr(branching, "train_reference_run", not_reached)
    arguments = {"measure": FAST, "train": ["--schedule", "fixed", "--epochs", "0.1", "--no-progress"],
                 "branch": ["--steps", "2", "--no-progress"]}[command]
    out = tmp_path / "out"
    with locked_output_folder(out):   # flock belongs to the open file: a holder in this process counts as another
        (out / "history.csv").write_text("the first run's\n")
        assert main([command, *arguments, "--out", str(out)]) == 2
        line = _error_line(capsys)
        assert f"--out '{out}' is in use by another noisescale run, which holds the lock {out}/.noisescale.lock" in line
        assert (out / "history.csv").read_text() == "the first run's\n"
    with locked_output_folder(out):   # released by the refused run and by the holder
        pass


def test_a_checkpoint_file_in_use_by_another_run_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """Two train runs with their own --out but one --checkpoint path (a sweep script that varies --out only)
    overwrote each other's checkpoints, and a resume loaded the other run's. While one holds the file, a second is
    refused in one line naming it; another file in the same folder is free, and so is the file once released."""
    from noisescale.app.options import locked_output_file

    started = []
    monkeypatch.setattr(train_job, "build_training_job", lambda *args, **kwargs: started.append(1) or 1 / 0)
    checkpoint = tmp_path / "checkpoints" / "run.pt"
    arguments = ["train", "--schedule", "fixed", "--epochs", "0.1", "--no-progress", "--checkpoint", str(checkpoint)]
    with locked_output_file(checkpoint, "--checkpoint"):
        assert main([*arguments, "--out", str(tmp_path / "second")]) == 2
        line = _error_line(capsys)
        assert (f"--checkpoint '{checkpoint}' is in use by another noisescale run, which holds the lock "
                f"{checkpoint.parent}/.run.pt.lock") in line
        assert not started and not checkpoint.exists()
        # another file in the folder: the run starts (and fails here, in the stand-in job)
        assert main([*arguments[:-1], str(checkpoint.parent / "other.pt"), "--out", str(tmp_path / "third")]) != 0
        assert started and "ZeroDivisionError" in _error_line(capsys)
    with locked_output_file(checkpoint, "--checkpoint"):   # released by the refused run and by the holder
        pass


def test_a_train_batch_above_its_largest_names_both_options_before_any_job(tmp_path, capsys, monkeypatch):
    """It used to fail inside the batch-size source, naming min_batch_size/max_batch_size rather than the flags."""
    def not_reached(*args, **kwargs):
        raise AssertionError("the job started before the batch sizes were checked")

    monkeypatch.setattr(train_job, "build_training_job", not_reached)
    assert main(["train", "--schedule", "fixed", "--batch-size", "2048", "--no-progress", "--out",
                 str(tmp_path / "out")]) == 2
    assert "--batch-size '2048': must not exceed --max-batch-size (1024" in _error_line(capsys)


@pytest.mark.parametrize(("arguments", "expected"), [
    (["--schedule", "fixed", "--lr-coupling", "sqrt"], "--lr-coupling 'sqrt': applies to --schedule noise-adaptive "
                                                       "only, not fixed"),
    (["--schedule", "lr-decay", "--kappa", "2"], "--kappa '2.0': applies to --schedule noise-adaptive only"),
    (["--schedule", "noise-adaptive", "--noise-scale", "b_noise"], "--noise-scale 'b_noise': needs --hessian-every "
                                                                   "k >= 1"),
    (["--schedule", "noise-adaptive", "--batch-size", "33", "--max-batch-size", "64"],
     "--batch-size '33': must be a multiple of the 2 processes"),
])
def test_train_options_that_would_be_ignored_or_named_in_api_terms_are_refused_by_their_flags(
        arguments, expected, tmp_path, capsys, monkeypatch):
    """A new user's trial: --lr-coupling, --kappa and --noise-scale were accepted and ignored by the schedules;
    --noise-scale b_noise without --hessian-every asked for "monitor_options={'hessian_every': k}"; under torchrun
    an odd --batch-size on 2 processes said "min_batch_size=33 is not a multiple of granularity=2", once per rank.
    (Two processes are simulated: the check reads the process group's size before any data or model.)"""
    class TwoProcesses:
        @staticmethod
        def is_initialized():
            return True

        @staticmethod
        def get_world_size():
            return 2

    def not_reached(*args, **kwargs):
        raise AssertionError("the job started before the options were checked")

    monkeypatch.setattr(train_job, "dist", TwoProcesses)
    monkeypatch.setattr(train_job, "build_training_job", not_reached)
    assert main(["train", "--epochs", "0.1", "--no-progress", *arguments, "--out", str(tmp_path / "out")]) == 2
    assert expected in _error_line(capsys)


def test_max_micro_batch_below_one_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--max-micro-batch", "0", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "argument --max-micro-batch: expected a finite int >= 1" in capsys.readouterr().err


def test_the_unexpected_error_is_one_line_with_exit_status_1(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something inside\nwent wrong")

    monkeypatch.setattr(measure_job, "build_training_job", broken)
    assert main(["measure", *FAST, "--out", str(tmp_path)]) == 1
    assert "RuntimeError: something inside went wrong (run with --debug for the traceback)" in _error_line(capsys)


def test_sweep_checks_its_options_before_training(tmp_path, capsys):
    arguments = ["sweep", "--batch-sizes", "8,16,32", "--max-steps", "5", "--no-progress"]
    assert main([*arguments, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s.csv")]) == 2
    assert "--data '" in _error_line(capsys)
    assert main([*arguments, "--device", "mps", "--out", str(tmp_path / "s.csv")]) == 2
    assert "--device 'mps'" in _error_line(capsys)
    assert main([*arguments, "--out", str(tmp_path)]) == 2
    assert "is a folder; name a file" in _error_line(capsys)
    assert main([*arguments, "--smoothing-window", "2", "--out", str(tmp_path / "s.csv")]) == 2
    assert "--smoothing-window: smoothing_window must be odd" in _error_line(capsys)
    assert not (tmp_path / "s.csv").exists()

    assert main([*arguments, "--target", "2", "--out", str(tmp_path / "s.csv")]) == 2
    assert "--target: target must lie in (0, 1)" in _error_line(capsys)   # it named "--a"

    # fewer batch sizes than the fit needs: every cell was trained, then "no fit: 0 of 2 ... lower the target"
    assert main([*arguments, "--batch-sizes", "8,16", "--out", str(tmp_path / "s.csv")]) == 2
    assert ("--batch-sizes 8,16: 2 batch size(s); the fit S = S_min (1 + B_crit / B) needs at least 3"
            in _error_line(capsys))
    assert main([*arguments[:1], "--min-batch", "8", "--max-batch", "16", "--out", str(tmp_path / "s.csv")]) == 2
    assert "--min-batch 8 --max-batch 16: 2 batch size(s)" in _error_line(capsys)
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("option", [["--tolerance", "-1"], ["--tolerance", "nan"], ["--seeds", "0"],
                                    ["--branch-examples", "0"], ["--steps", "0"], ["--block-size", "0"]])
def test_branch_refuses_bad_numbers_before_the_reference_run(option, tmp_path, capsys):
    """They were refused only after the reference run and every branch had been trained and written (an audit's
    finding); now by the parser, naming the option, and nothing is written."""
    with pytest.raises(SystemExit) as exit_:
        main(["branch", *option, "--out", str(tmp_path / "b")])
    assert exit_.value.code == 2
    assert f"argument {option[0]}: expected a finite" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

def test_the_command_line_fails_in_one_line_from_a_shell(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(noisescale.__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-m", "noisescale", "measure", "--model", "nowhere:make"],
                          capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("noisescale: error: --model 'nowhere:make': cannot import module 'nowhere': "
                                   "ModuleNotFoundError: No module named 'nowhere'")


def test_a_terminated_command_exits_143_and_leaves_no_temporary_file(tmp_path, hang_deadline_s):
    """SIGTERM (a scheduler's stop, torchrun's) killed the command where it stood: a figure or summary being written
    left its hidden .tmp file (a new user's trial, 2 of 5 kills). It now ends the command as a Ctrl-C does, the file
    being written abandoned cleanly, with exit status 143. The signal is sent once the run holds its --out folder."""
    import signal
    import time

    out = tmp_path / "out"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(noisescale.__file__).parent.parent)}
    process = subprocess.Popen([sys.executable, "-m", "noisescale", "measure", "--steps", "100000", "--batch-size", "8",
                                "--hessian-every", "0", "--no-progress", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, cwd=tmp_path)
    deadline = time.monotonic() + hang_deadline_s
    while not (out / ".noisescale.lock").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=hang_deadline_s)
    assert process.returncode == 143 and stderr.strip().endswith("noisescale: terminated")
    assert [path.name for path in out.iterdir()] == [".noisescale.lock"]


# ---------------------------------------------------------------------------------------------- help and options
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["measure", "train", "sweep", "nqm"])
def test_help_shows_every_default(command):
    parser = _subcommands()[command]
    formatter = parser.formatter_class(prog=parser.prog)
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS or action.required:
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        assert "default" in formatter._get_help_string(action), f"{command} {action.option_strings[0]}"
    text = " ".join(parser.format_help().split())
    assert "%%" not in text and "%(" not in text
    if command != "nqm":
        assert "--device DEVICE auto (CUDA when present, else CPU) | cpu | cuda | cuda:N (default: auto)" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"noisescale {noisescale.__version__}"


def test_the_training_commands_share_option_names_and_defaults():
    parsers = _subcommands()
    shared = ["--model", "--data", "--device", "--out", "--seed", "--threads", "--no-progress", "--debug"]
    defaults = {}
    for command in ("measure", "train", "sweep"):
        actions = {option: action for action in parsers[command]._actions for option in action.option_strings}
        assert all(option in actions for option in shared), command
        assert "--data-source" not in actions
        defaults[command] = {option: actions[option].default for option in ("--model", "--device", "--seed",
                                                                             "--threads")}
        assert str(actions["--out"].default).startswith("runs/")
    assert defaults["measure"] == defaults["train"] == defaults["sweep"]
    assert defaults["sweep"] == {"--model": "noisescale.models:lenet5", "--device": "auto", "--seed": 0,
                                 "--threads": DEFAULT_THREADS}


def test_threads_sets_torch_threads_and_the_default_leaves_them(tmp_path):
    before = torch.get_num_threads()
    try:
        set_threads(None)
        assert torch.get_num_threads() == before
        assert main(["measure", *FAST, "--model", "_cli_user_code:make_text_model", "--dataset",
                     "_cli_user_code:make_text_data", "--threads", "1", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_command_line_asks_openmp_for_sleeping_threads_unless_the_user_chose(monkeypatch, capsys):
    """OMP_WAIT_POLICY=PASSIVE before torch loads (tests/conftest.py measured why); a user's own value is kept."""
    import os

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("command", ["measure", "train", "sweep", "branch"])
@pytest.mark.parametrize("rate", ["nan", "-1", "0", "inf"])
def test_a_learning_rate_that_is_not_a_positive_number_is_refused_by_the_parser(command, rate, tmp_path, capsys):
    """measure --lr nan trained and reported a diverged run, advising a lower learning rate; --lr -1 got torch's
    words without the option (an audit's finding)."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--lr", rate, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "argument --lr: expected a finite float > 0.0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("sizes", "examples", "expected"), [
    ("4,8,16,32,64", "24", "--branch-batch-sizes 4,8,16,32,64 --branch-examples 24: batch size(s) [32, 64] exceed"),
    ("4,8,16", "24", "--branch-batch-sizes 4,8,16 --branch-examples 24: branch_examples=24 is not a multiple of "
                     "batch size(s) [16]"),
    ("8", "64", "--branch-batch-sizes 8 --branch-examples 64: batch_sizes [8] has 1 batch size(s)"),
    ("8,8,16", "64", "strictly increasing without repeats"),
])
def test_branch_refuses_batch_sizes_it_would_not_train_before_the_reference_run(sizes, examples, expected, tmp_path,
                                                                               capsys, monkeypatch):
    """A new user's --branch-examples 24 with --branch-batch-sizes up to 64 printed B_crit = 64 for batch sizes
    that each took one step of 24 sequences; now refused before anything is trained or written."""
    import noisescale.branching as branching

    monkeypatch.setattr(branching, "train_reference_run", lambda *a, **k: pytest.fail("trained"))
    assert main(["branch", "--branch-batch-sizes", sizes, "--branch-examples", examples, "--no-progress",
                 "--out", str(tmp_path / "b")]) == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "b").exists()
