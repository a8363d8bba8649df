"""Spawning a few CPU (gloo) ranks from a test: a rendezvous, errors captured in a rank for the test to compare, and
a wait that fails only on a hang (no rank reports progress for ``hang_deadline_s``), never on a slow machine; a
process group of the test process alone; and the check shared by the integrations' DDP tests.

Rendezvous go through a file or an in-memory store, never a TCP port chosen free: another process on a busy machine
can take that port before the store binds it, and the ranks then wait for peers that never come. The frameworks that
would rendezvous from ``MASTER_PORT`` (the HF Trainer through accelerate, Lightning) find the group made already
(:func:`framework_rank`) and use it."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from noisescale.estimators import ExponentialMovingNoiseScale


def file_rendezvous(out_dir: str | Path) -> str:
    """``init_method`` for ranks that share ``out_dir``: a file store, no port."""
    return (Path(out_dir) / "rendezvous").resolve().as_uri()


def framework_rank(rank: int, world_size: int, out_dir: str | Path) -> None:
    """Make this spawned process rank ``rank`` as torchrun would (one torch thread, the environment a framework
    reads), with the default gloo group already made on a file store in ``out_dir``: accelerate and Lightning skip
    their own rendezvous from ``MASTER_ADDR``/``MASTER_PORT`` when a group exists."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), NODE_RANK="0")
    dist.init_process_group("gloo", init_method=file_rendezvous(out_dir), rank=rank, world_size=world_size)


@contextlib.contextmanager
def one_rank_process_group():
    """The default gloo process group of this process alone (world size 1), on an in-memory store, destroyed on
    exit: DDP around a model without another process. Garbage is collected before the group is destroyed, so that a
    DDP reducer left in a reference cycle (a monitor's hooks) lets go of the group while it still exists, not at
    some later collection: the CI stopped once in a test of such a group, with no Python frame of the test left."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        gc.collect()
        dist.destroy_process_group()


REPOSITORY = Path(__file__).resolve().parents[1]


def torchrun_noisescale(*arguments: str, deadline_s: float, stderr: bool = False) -> str | tuple[str, str]:
    """``torchrun --standalone --nproc_per_node 2 -m noisescale ARGUMENTS --no-progress`` on CPU (gloo), one torch
    thread per rank; returns what it printed (and, with ``stderr``, what it printed there). ``deadline_s`` only
    catches a hang (tests/conftest.py). A failure shows
    both streams, head and tail; with ``PYTHONFAULTHANDLER`` a rank that aborts prints its threads' Python stacks."""
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "PYTHONFAULTHANDLER": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "noisescale",
         *arguments, "--no-progress"],
        capture_output=True, text=True, timeout=deadline_s, env=environment, cwd=REPOSITORY)
    assert completed.returncode == 0, "\n".join([
        f"torchrun exited with {completed.returncode}", "stdout:", _head_and_tail(completed.stdout, 1500),
        "stderr:", _head_and_tail(completed.stderr, 4000)])
    return (completed.stdout, completed.stderr) if stderr else completed.stdout


def _head_and_tail(text: str, each: int) -> str:
    return text if len(text) <= 2 * each else f"{text[:each]}\n[... {len(text) - 2 * each} characters ...]\n" \
        f"{text[-each:]}"


def capture_error(function) -> tuple[str, str] | None:
    """(type name, message) of what ``function()`` raises, or None: a rank records it for the test to check."""
    try:
        function()
    except Exception as error:  # noqa: BLE001 - the test compares the type and message
        return (type(error).__name__, str(error))
    return None


def report_progress(out_dir: str | Path, rank: int, scenario: str) -> None:
    """Note that ``rank`` finished ``scenario``: :func:`spawn_ranks` watches these notes to tell a hang from slowness."""
    with open(Path(out_dir) / f"rank{rank}.progress", "a") as progress:
        progress.write(f"{scenario}\n")


def _progress(out_dir: Path) -> dict[str, list[str]]:
    return {path.stem: path.read_text().split() for path in sorted(out_dir.glob("rank*.progress"))}


def _rank_then_exit(rank: int, worker, *args) -> None:
    """``worker(rank, *args)``, then exit without finalizing the interpreter, as the CLI's torchrun ranks do
    (``noisescale.app.cli.run``: gloo's workers outlive destroy_process_group and abort a finalizing process); a
    worker that raises is reported by torch's spawn wrapper as before."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker, args: tuple, nprocs: int, out_dir: str | Path, hang_deadline_s: float) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes and wait for all of them. Fails the test when
    no rank has reported progress (:func:`report_progress`) and none has finished for ``hang_deadline_s`` seconds."""
    out_dir = Path(out_dir)
    context = mp.start_processes(_rank_then_exit, args=(worker, *args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    progress, last_change = {}, time.monotonic()
    while not context.join(timeout=1):
        if _progress(out_dir) != progress:
            progress, last_change = _progress(out_dir), time.monotonic()
        elif time.monotonic() - last_change > hang_deadline_s:
            for process in context.processes:
                process.terminate()
            last_finished = {rank: done[-1] for rank, done in progress.items() if done}
            pytest.fail(f"the {nprocs} ranks made no progress for {hang_deadline_s:g} s, a hang; scenarios finished "
                        f"by each rank: {last_finished or 'none'}. On a machine this slow, set "
                        "NOISESCALE_TEST_HANG_S to a larger number of seconds")


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters and buffers of a sharded (FSDP) model by name, gathered on every rank and cloned: the
    weights a test's reference loop loads into an unsharded copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {key: value.detach().clone() for key, value in state.items()}


def spawn_and_load(worker, world_size: int, out_dir: str | Path, hang_deadline_s: float) -> list[dict]:
    """Run ``worker(rank, out_dir)`` on ``world_size`` ranks, each saving its results to rank{rank}.pt, and return
    those results in rank order."""
    spawn_ranks(worker, (str(out_dir),), world_size, out_dir, hang_deadline_s)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def check_global_batch_history(ranks: list[dict], batch_sizes: list[int], global_estimate, rtol: float, *,
                               prefix: str = "") -> ExponentialMovingNoiseScale:
    """An integration's DDP run: on every rank the parameters equal plain DDP's (``prefix`` + "plain" and
    "measured") and the history is the same, and that history is the moving average (decay 0.5) of the estimates of
    each step's global batch, ``global_estimate(k)`` (a NoiseScaleEstimate from an independent loop at step k).
    Returns the reference average after the last step."""
    for result in ranks:
        assert all(torch.equal(p, q) for p, q in zip(result[prefix + "plain"], result[prefix + "measured"]))
    history = ranks[0][prefix + "history"]
    assert history.equals(ranks[1][prefix + "history"])
    assert list(history["batch_size"]) == batch_sizes
    average = ExponentialMovingNoiseScale(0.5)
    for k, row in history.iterrows():
        average.update_estimate(global_estimate(k))
        assert row["grad_sqnorm_ema"] == pytest.approx(average.grad_sqnorm, rel=rtol)
        assert row["trace_sigma_ema"] == pytest.approx(average.trace_sigma, rel=rtol)
        assert row["b_simple"] == pytest.approx(average.b_simple, rel=rtol)
    return average
