"""Printing an estimate with the digits its interval supports, no more.

An estimate printed as 127.6 (98.95 .. 179.6) claims four digits where its 90% interval is about +-30%: the last
two are noise (repeat runs of the README's quick start printed 121.6 to 137.5). Here every number of an estimate
is rounded at one decimal place below the leading digit of the interval's narrower side (value - low or
high - value): 128 (99 .. 180), 7.54 (7.21 .. 7.86), and at most 4 significant digits of the value. Without a
finite side (no interval, or 0 .. unbounded) the value keeps 2 significant digits; a value of 0 or inf (a fit at a
limit of its model) gives its finite bounds 2.
"""

from __future__ import annotations

import math

__all__ = ["estimate_digits", "rounded", "significant_digits", "with_significant_digits"]

_MOST = 4   # significant digits of the value at most, however narrow the interval
_WITHOUT_INTERVAL = 2


def estimate_digits(value: float, low: float = math.nan, high: float = math.nan) -> int:
    """The decimal exponent p to round ``value`` and its interval's bounds at (to a multiple of 10^p)."""
    if not (math.isfinite(value) and value != 0):   # 0 or inf at a limit of the model: the bounds' 2 digits
        bounds = [abs(bound) for bound in (low, high) if math.isfinite(bound) and bound != 0]
        return math.floor(math.log10(max(bounds))) - _WITHOUT_INTERVAL + 1 if bounds else 0
    sides = [side for side in (value - low, high - value) if math.isfinite(side) and side > 0]
    top = math.floor(math.log10(abs(value)))
    if not sides:
        return top - _WITHOUT_INTERVAL + 1
    return max(math.floor(math.log10(min(sides))) - 1, top - _MOST + 1)


def significant_digits(value: float, exponent: int) -> int:
    """How many significant digits ``value`` keeps when rounded at 10^``exponent`` (at least 1)."""
    if not (math.isfinite(value) and value != 0):
        return 1
    return max(1, math.floor(math.log10(abs(value))) - exponent + 1)


def rounded(value: float, exponent: int) -> str:
    """``value`` rounded at 10^``exponent``, in plain notation between 1e-4 and 1e7, else in scientific notation;
    non-finite values as Python writes them (inf, nan)."""
    if not math.isfinite(value):
        return f"{value}"
    if value == 0:
        return "0"
    if 1e-4 <= abs(value) < 1e7:
        return f"{round(value, -exponent):.0f}" if exponent >= 0 else f"{value:.{-exponent}f}"
    return f"{value:.{significant_digits(value, exponent) - 1}e}"


def with_significant_digits(value: float, digits: int) -> str:
    """``value`` with ``digits`` significant digits, trailing zeros kept (0.0030, 4.0), as :func:`rounded` writes."""
    if not (math.isfinite(value) and value != 0):
        return rounded(value, 0)
    return rounded(value, math.floor(math.log10(abs(value))) - digits + 1)
