"""Atomic writes and safe checkpoint loading: a write killed half-way leaves the old file whole; an empty, cut
or foreign checkpoint, or one whose loading would run code, is refused with a message naming where it came from
(and runs nothing); the `noisescale train` command saves and resumes through them."""

from __future__ import annotations

import builtins
import io
import os

import pytest
import torch

import noisescale.checkpoints as checkpoints
from noisescale.app.cli import main
from noisescale.checkpoints import (CheckpointError, atomic_path, atomic_write, load_checkpoint, save_checkpoint,
                                   to_plain)


class Killed(BaseException):
    """Stands for the process being killed during a write (not an Exception: nothing may catch it)."""


def files_in(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_atomic_write_killed_half_way_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old,complete\n1,2\n")
    with pytest.raises(Killed):
        with atomic_write(target) as handle:
            handle.write("new,half")
            handle.flush()
            raise Killed
    assert target.read_text() == "old,complete\n1,2\n"
    assert files_in(tmp_path) == ["results.csv"]  # no temporary file left behind
    with atomic_write(target) as handle:
        handle.write("new,complete\n")
    assert target.read_text() == "new,complete\n" and files_in(tmp_path) == ["results.csv"]


def test_atomic_write_whose_replace_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "results.csv"
    target.write_text("old\n")

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        with atomic_write(target) as handle:
            handle.write("new\n")
    assert target.read_text() == "old\n" and files_in(tmp_path) == ["results.csv"]


def test_a_save_killed_half_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    save_checkpoint({"step": torch.tensor(1), "history": [{"loss": 0.5}]}, path)
    real_save = torch.save

    def killed_after_half_the_bytes(state, handle):
        buffer = io.BytesIO()
        real_save(state, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise Killed

    monkeypatch.setattr(torch, "save", killed_after_half_the_bytes)
    with pytest.raises(Killed):
        save_checkpoint({"step": torch.tensor(2), "history": [{"loss": 0.4}] * 100}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert int(state["step"]) == 1 and state["history"] == [{"loss": 0.5}]
    assert files_in(tmp_path) == ["run.pt"]


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "garbage", "not a dict", "other keys"])
def test_a_damaged_checkpoint_is_refused_naming_the_option_and_the_path(tmp_path, damage):
    path = tmp_path / "run.pt"
    buffer = io.BytesIO()
    torch.save({"trainer": {"weights": torch.arange(10_000.0)}, "evaluations": []}, buffer)
    contents = {
        "empty": b"",
        "truncated": buffer.getvalue()[:2000],
        "garbage": b"\x00this is not a checkpoint\xff" * 50,
    }
    if damage in contents:
        path.write_bytes(contents[damage])
    elif damage == "not a dict":
        torch.save([torch.zeros(2)], path)
    elif damage == "other keys":
        torch.save({"model": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path, required_keys=("trainer", "evaluations"), source="--resume")
    message = str(raised.value)
    assert message.startswith(f"--resume {path}: ")
    assert "Traceback" not in message and "Errno" not in message


class WritesAMarker:
    """A crafted checkpoint object: unpickling it calls open(marker, "w"), i.e. runs code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_a_checkpoint_whose_loading_would_run_code_is_refused_and_runs_nothing(tmp_path):
    path, marker = tmp_path / "crafted.pt", tmp_path / "marker"
    torch.save({"trainer": WritesAMarker(marker), "evaluations": []}, path)
    with pytest.raises(CheckpointError, match="--resume .*crafted.pt.*could run code"):
        load_checkpoint(path, source="--resume")
    assert not marker.exists()
    # the unsafe load the train command used before does run it: the test can tell the two apart
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_to_plain_turns_numpy_scalars_into_python_numbers_and_keeps_tensors():
    import numpy as np

    tensor = torch.ones(2)
    plain = to_plain({"a": np.float64(0.25), "b": [np.int64(3), (np.bool_(True), "x")], "c": tensor,
                      "d": np.arange(2.0)})
    assert plain == {"a": 0.25, "b": [3, (True, "x")], "c": tensor, "d": [0.0, 1.0]}
    assert type(plain["a"]) is float and type(plain["b"][0]) is int and type(plain["b"][1][0]) is bool


# --------------------------------------------------------------------------- the train command

TRAIN = ["train", "--schedule", "fixed", "--model", "noisescale.models:mlp", "--train-examples", "128",
         "--batch-size", "32", "--max-batch-size", "32", "--no-progress", "--device", "cpu"]


def test_train_command_refuses_a_damaged_resume_file_naming_resume(tmp_path, capsys):
    damaged = tmp_path / "run.pt"
    damaged.write_bytes(b"PK\x03\x04 half a zip")
    assert main([*TRAIN, "--epochs", "1", "--resume", str(damaged), "--out", str(tmp_path)]) == 2
    assert f"CheckpointError: --resume {damaged}: cannot be loaded" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=f"--resume {damaged}: "):
        main([*TRAIN, "--epochs", "1", "--resume", str(damaged), "--out", str(tmp_path), "--debug"])


def test_train_command_killed_while_saving_keeps_the_last_whole_checkpoint(tmp_path, monkeypatch):
    """Epoch 1's checkpoint is saved; the save after epoch 2 is killed half-way: the file still holds epoch 1's
    checkpoint, which loads safely and resumes the run."""
    path = tmp_path / "run.pt"
    real_save, saves = torch.save, []

    def killed_on_the_second_save(state, handle):
        saves.append(1)
        if len(saves) == 2:
            buffer = io.BytesIO()
            real_save(state, buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 3])
            raise Killed
        real_save(state, handle)

    monkeypatch.setattr(torch, "save", killed_on_the_second_save)
    with pytest.raises(Killed):
        main([*TRAIN, "--epochs", "2", "--checkpoint", str(path), "--out", str(tmp_path)])
    monkeypatch.undo()
    state = load_checkpoint(path, source="--resume")
    assert [row["step"] for row in state["evaluations"]] == [4]  # 128 examples / 32 = 4 steps in epoch 1
    assert len(state["trainer"]["history"]) == 4
    assert [name for name in os.listdir(tmp_path) if ".tmp" in name] == []
    assert main([*TRAIN, "--epochs", "2", "--resume", str(path), "--out", str(tmp_path)]) == 0


def test_result_files_get_a_new_file_s_permissions_and_a_failed_write_leaves_the_old_one(tmp_path):
    """The CLI's CSVs, figure and summary went through a mkstemp file: mode 0600, unlike every other file the
    user gets (a new user's history CSV was -rw-------). Now they get the umask's permissions, like the
    checkpoints; a write that raises leaves the old file and no temporary one."""
    import stat

    umask = os.umask(0o022)
    try:
        path = tmp_path / "history.csv"
        with atomic_path(path) as temporary:
            assert temporary.suffix == ".csv" and temporary.parent == tmp_path
            temporary.write_text("a,b\n1,2\n")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_text() == "a,b\n1,2\n"
        with pytest.raises(RuntimeError, match="disk full"):
            with atomic_path(path) as temporary:
                temporary.write_text("half")
                raise RuntimeError("disk full")
        assert path.read_text() == "a,b\n1,2\n" and os.listdir(tmp_path) == ["history.csv"]
    finally:
        os.umask(umask)
