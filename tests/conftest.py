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
1800) without progress, a hang; a busy machine makes the suite slower, never red.
"""

from __future__ import annotations

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
HANG_DEADLINE_S = _positive_number_from_environment("NOISESCALE_TEST_HANG_S", "1800", float)

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
