"""Suite-wide settings, so that the tests pass on a busy machine: explicit thread counts, and deadlines that catch
a hung child process rather than a slow one.

Threads: torch's default is one OpenMP thread per core. On a machine whose cores other processes also use, every
parallel operation then waits at its closing barrier for the thread that the scheduler has put aside, while the
threads that are done spin and take CPU time from the others (a 50-step ``measure`` took 2.5 to 4 times longer at 2
threads than at 1 on a loaded 2-core machine). Every test process therefore runs torch in
``NOISESCALE_TEST_THREADS`` threads (default 1): this one through ``torch.set_num_threads``, the processes it
starts (DDP ranks, torchrun, notebook kernels, sweep workers) through ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``,
which they inherit.

Deadlines: a test that waits for other processes gives up only after ``NOISESCALE_TEST_HANG_S`` seconds (default
540) without progress, a hang; a busy machine makes the suite slower, never red. A test still running a minute
after that (the slowest takes under 30 s on a quiet 2-core machine) is hung wherever it waits, a C++ call or a
rendezvous included: every thread's Python stack is printed and the run ends with exit status 1, so that CI shows
where rather than only that it ran out of time.
"""

from __future__ import annotations

import faulthandler
import os


def _positive_number_from_environment(name: str, default: str, kind: type) -> int | float:
    text = os.environ.get(name, default)
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise ValueError(f"{name} must be a {kind.__name__} > 0, got {text!r}; unset it for the default {default}")
    return value


TEST_THREADS = _positive_number_from_environment("NOISESCALE_TEST_THREADS", "1", int)
# 540 + 60: a hung test's stacks come 10 minutes in, inside CI's 30 (the full run stopped twice in a futex wait
# with other jobs on the machine, sessions 21 and 23, not reproduced since; 1800 + 60 would print nothing in time)
HANG_DEADLINE_S = _positive_number_from_environment("NOISESCALE_TEST_HANG_S", "540", float)

# before torch starts its OpenMP runtime here, and inherited by every process the tests start
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = str(TEST_THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def hang_deadline_s() -> float:
    """Seconds a test waits for a child process that makes no progress (``NOISESCALE_TEST_HANG_S``)."""
    return HANG_DEADLINE_S


def pytest_configure(config):
    """A copy of the terminal's stderr, taken before any test captures fd 2, for the hang guard's stacks."""
    config.hang_report_fd = os.dup(2)


def pytest_unconfigure(config):
    os.close(config.hang_report_fd)


@pytest.fixture(autouse=True)
def _a_hung_test_ends_the_run_with_its_stacks(pytestconfig):
    """``NOISESCALE_TEST_HANG_S`` + 60 seconds in one test (a minute for a test's own hang report to come first):
    every thread's stack to the terminal, then exit 1."""
    faulthandler.dump_traceback_later(HANG_DEADLINE_S + 60, exit=True, file=pytestconfig.hang_report_fd)
    yield
    faulthandler.cancel_dump_traceback_later()
