"""Printing an estimate with the digits its interval supports, no more.

An estimate printed as 127.6 (98.95 .. 179.6) claims four digits where its 90% interval is about +-30%: the last
two are noise (repeat runs of the README's quick start printed 121.6 to 137.5). Here an estimate and its bounds are
rounded at one decimal place below the leading digit of the interval's narrower side (value - low or high - value):
128 (99 .. 180), 7.54 (7.21 .. 7.86). The value keeps at least 1 significant digit (B_noise 1.3 with an interval of
-178 .. 180 is 1, not 0) and every number at most 4. Without a finite side (no interval, or 0 .. unbounded) the value
keeps 2 significant digits; a value of 0 or inf (a fit at a limit of its model) gives its finite bounds 2. One line
is written in one notation: scientific where any of its numbers is below 1e-4 or from 1e7 on.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["UNBOUNDED", "Printed", "estimate_digits", "printed", "printed_b_simple", "rounded",
           "significant_digits", "with_significant_digits"]

_MOST = 4   # significant digits of any number at most, however narrow the interval
# the upper bound of a B_simple interval at +inf (Fieller's, while the averaged |G|^2 is not resolved from 0)
UNBOUNDED = "unbounded: |G|^2 not resolved from 0"
_WITHOUT_INTERVAL = 2


def _top(value: float) -> int:
    return math.floor(math.log10(abs(value)))


def estimate_digits(value: float, low: float = math.nan, high: float = math.nan) -> int:
    """The decimal exponent p to round ``value`` and its interval's bounds at (to a multiple of 10^p)."""
    if not (math.isfinite(value) and value != 0):   # 0 or inf at a limit of the model: the bounds' 2 digits
        bounds = [abs(bound) for bound in (low, high) if math.isfinite(bound) and bound != 0]
        return _top(max(bounds)) - _WITHOUT_INTERVAL + 1 if bounds else 0
    sides = [side for side in (value - low, high - value) if math.isfinite(side) and side > 0]
    top = _top(value)
    if not sides:
        return top - _WITHOUT_INTERVAL + 1
    return min(max(_top(min(sides)) - 1, top - _MOST + 1), top)


def significant_digits(value: float, exponent: int) -> int:
    """How many significant digits ``value`` keeps when rounded at 10^``exponent`` (at least 1)."""
    if not (math.isfinite(value) and value != 0):
        return 1
    return max(1, _top(value) - exponent + 1)


def _scientific(value: float) -> bool:
    return math.isfinite(value) and value != 0 and not 1e-4 <= abs(value) < 1e7


def rounded(value: float, exponent: int, scientific: bool | None = None) -> str:
    """``value`` rounded at 10^``exponent`` (and to at most 4 significant digits), in plain notation between 1e-4
    and 1e7 and scientific notation outside (or as ``scientific`` says); non-finite values as Python writes them."""
    if not math.isfinite(value):
        return f"{value}"
    if value == 0:
        return "0"
    exponent = max(exponent, _top(value) - _MOST + 1)
    if not (_scientific(value) if scientific is None else scientific):
        return f"{round(value, -exponent):.0f}" if exponent >= 0 else f"{value:.{-exponent}f}"
    return f"{value:.{significant_digits(value, exponent) - 1}e}"


class Printed(NamedTuple):
    """An estimate and its interval as printed (:func:`printed`), with the exponent they were rounded at."""

    place: int
    value: str
    low: str
    high: str


def printed(value: float, low: float = math.nan, high: float = math.nan) -> Printed:
    """``value`` and its bounds rounded at :func:`estimate_digits`, in one notation."""
    place = estimate_digits(value, low, high)
    scientific = any(_scientific(number) for number in (value, low, high))
    return Printed(place, *(rounded(number, place, scientific) for number in (value, low, high)))


def printed_b_simple(value: float, low: float, high: float, unbounded: str = UNBOUNDED) -> Printed:
    """:func:`printed` for B_simple and its Fieller interval, whose upper bound is +inf while the averaged |G|^2 is
    not resolved from 0: that bound is written as ``unbounded``."""
    shown = printed(value, low, high)
    return shown._replace(high=unbounded) if high == math.inf else shown


def with_significant_digits(value: float, digits: int) -> str:
    """``value`` with ``digits`` significant digits, trailing zeros kept (0.0030, 4.0), as :func:`rounded` writes."""
    if not (math.isfinite(value) and value != 0):
        return rounded(value, 0)
    return rounded(value, _top(value) - digits + 1)
