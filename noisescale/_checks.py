"""Argument checks shared across noisescale: a clear TypeError/ValueError naming the argument; and the short list
of names such messages show."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= minimum (Python or numpy integers; bool rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: True or False (numpy's too), or the integers 1 and 0; anything else is refused (a str
    such as 'no' is truthy)."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_confidence(value: Any, name: str = "confidence") -> float:
    """``value`` as a float in (0, 1) (Python or numpy reals; bool rejected: TypeError, as any other non-number)."""
    value = check_real(value, name)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return value


def check_decay(value: Any, name: str = "decay") -> float:
    """``value`` as a float in [0, 1), the decay of a moving average (Python or numpy reals; bool rejected)."""
    value = check_real(value, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return value


def check_real(value: Any, name: str) -> float:
    """``value`` as a float (Python or numpy reals: ``numbers.Real``, which np.float32 is and float's subclasses
    alone are not; bool rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_finite(value: Any, name: str) -> float:
    """``value`` as a finite float."""
    value = check_real(value, name)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def listed(names: list[str], shown: int = 4) -> str:
    """The first ``shown`` of ``names`` joined by commas, and how many more there are, for a message."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def mark_repeated_rows(keys: Any, lines: Any, reasons: list[str | None], what: str) -> list[str | None]:
    """``reasons`` (one per CSV row, None for a row so far trusted) with "repeats the <what> of line N" for each
    trusted row whose key an earlier trusted row (at line N) has: the first copy is kept, a pasted or re-appended
    copy would count as another measurement. Shared by the sweep's CSV and
    :func:`noisescale.tradeoff.read_sweep_csv`."""
    seen: dict[Any, int] = {}
    marked = list(reasons)
    for index, (key, line) in enumerate(zip(keys, lines)):
        if marked[index] is not None:
            continue
        if key in seen:
            marked[index] = f"repeats the {what} of line {seen[key]}"
        else:
            seen[key] = line
    return marked
